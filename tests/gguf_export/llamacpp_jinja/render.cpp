// Renders chat templates with llama.cpp's own Jinja engine (common/jinja), the one llama-server
// and Ollama use for a GGUF's tokenizer.chat_template.
//
// stdin:  a JSON array of {"template": "...", "context": {"messages": [...], ...}}
// stdout: a JSON array, one {"text": "..."} or {"error": "..."} per request, in order.
// Built by scripts/build_llamacpp_jinja.py from the llama.cpp sources of the installed
// llama-cpp-python release.
#include <exception>
#include <iostream>
#include <iterator>
#include <string>

#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "json.h"

static std::string render(const std::string & source, const common_json & context) {
    jinja::lexer lexer;
    jinja::program ast = jinja::parse_from_tokens(lexer.tokenize(source));
    jinja::caps_get(ast);  // as llama.cpp does before rendering: it may adjust the program
    jinja::context ctx(source);
    jinja::global_from_json(ctx, context, true);
    jinja::runtime runtime(ctx);
    const jinja::value result = runtime.execute(ast);
    std::string text;
    for (const auto & part : jinja::runtime::gather_string_parts(result)->as_string().parts) {
        text += part.val;
    }
    return text;
}

int main() {
    std::string raw((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    common_json requests = common_json::parse(raw);
    common_json results = common_json::array();
    for (size_t i = 0; i < requests.size(); ++i) {
        const common_json & request = requests.at(i);
        try {
            results.push_back({{"text", render(request.at("template"), request.at("context"))}});
        } catch (const std::exception & error) {
            results.push_back({{"error", std::string(error.what())}});
        }
    }
    std::cout << results.dump_safe();
    return 0;
}
