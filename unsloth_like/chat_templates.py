"""Chat templates and conversation datasets: Unsloth's notebook helpers over plain HF objects.

``get_chat_template(tokenizer, "llama-3")`` gives a tokenizer whose ``chat_template`` renders
conversations the way the model family's official template does, with ``{% generation %}``
markers around every assistant reply (and its turn-end token), so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` yields the mask TRL's
``assistant_only_loss`` trains on. With ``map_eos_token=True`` the template's turn-end token
becomes the tokenizer's EOS, set through the tokenizer API and saved with it.

The design, and why:

* **One record per template** (``ChatTemplate`` in ``CHAT_TEMPLATES``): the Jinja body, the
  turn-end token, whether it starts with BOS, the family's default system message and the
  Ollama counterpart (Go template + ``stop`` parameters). The GGUF/Ollama export reads the
  same records, so the template a model is trained with and the one Ollama serves it with
  cannot drift apart; ``chat_template_spec(name_or_tokenizer)`` finds the record again.
* **Bodies are the official templates**, trimmed to text conversations (system / user /
  assistant; tools are refused) and split so that the reply sits inside the generation block.
  Everything that varies per call is a small Jinja *prelude* in front of the body, never an
  edit of the body: the ShareGPT key/role mapping, the default system message (inserted as a
  first system message, which is what Qwen's own default does), the role checks that make a
  template raise on roles it cannot render.
* **The template carries its own identity**: a Jinja comment at its top names the record and
  the system message used. Comments render nothing, and the comment travels wherever the
  template goes (``save_pretrained``, a GGUF's metadata), so ``chat_template_spec`` works on a
  reloaded tokenizer too.
* **Templates that use the tokenizer's EOS** as their turn end (Mistral, Zephyr, Vicuna,
  Alpaca, Unsloth's) have ``stop_token=None``; their Ollama template holds ``{__EOS_TOKEN__}``
  where the EOS goes, filled in by ``ChatTemplate.ollama(eos_token)``.
* **Ollama templates** use Ollama's ``.Messages`` form (as in ollama's ``template/*.gotmpl``)
  and render what the Jinja renders with ``add_generation_prompt=True``, minus the BOS (the
  runtime adds it). A default system message is not in the Go template: the export writes it
  as the Modelfile's ``SYSTEM``, which Ollama inserts as the first message, as the Jinja does.

Where the rendering differs from the official template, on purpose:

* Gemma 1/2 and Mistral v0.1 refuse a system message; here it starts the first user turn, as
  Gemma 3's template does (followed by a blank line), and as Mistral documents for its v1 models.
* Phi-3 ends a finished conversation with ``eos_token``; once ``<|end|>`` is the EOS that would
  repeat it, so the extra token is only written while the EOS is another token.
* Llama 3.2's template prints today's date; ``llama-3.2`` uses 3.1/3.3's fixed date (pass
  ``date_string=...`` to ``apply_chat_template`` for another), so renders are reproducible.
* Tool definitions and tool messages raise instead of being rendered, and so do roles the
  official template would silently skip: a training example should never lose a turn quietly.

Nothing here imports transformers, trl or datasets: tokenizers and datasets come in as objects,
so ``import unsloth_like`` stays light.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "apply_chat_template",
    "chat_template_spec",
    "get_chat_template",
    "inference_template",
    "standardize_sharegpt",
    "stop_on_tokenizer_eos",
    "to_sharegpt",
    "train_on_responses_only",
    "without_generation_markers",
]

EOS_PLACEHOLDER = "{__EOS_TOKEN__}"
DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}
_HEADER = "{#- unsloth_like chat template "
_HEADER_RE = re.compile(r"^\{#- unsloth_like chat template (\{.*?\}) -#\}")
_GENERATION_TAG_RE = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
# Same preference order as the loader's pad choice (models/loader.py); EOS is never the pad.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<|PAD_TOKEN|>")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: its Jinja body for Hugging Face and its Ollama counterpart.

    ``body`` renders ``messages`` (role/content dicts, already checked by the prelude that
    ``jinja``/``build_jinja`` put in front of it). ``stop_token`` is the token that ends a turn
    (``None``: the tokenizer's own EOS, which the body writes as ``eos_token``).
    """

    name: str
    body: str
    stop_token: str | None
    adds_bos: bool
    default_system_message: str | None
    ollama_template: str
    ollama_stop: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    system_first_only: bool = False  # a system message is only accepted as the first message
    source: str = ""  # where the rendering comes from
    prompt: str | None = None  # the {INPUT}/{OUTPUT} prompt a "prompt" template was built from

    @property
    def jinja(self) -> str:
        """The complete Hugging Face template with this record's defaults."""
        return build_jinja(self)

    def ollama(self, eos_token: str | None = None) -> tuple[str, tuple[str, ...]]:
        """``(go_template, stop_parameters)`` with the EOS filled in where the template uses it."""
        if self.stop_token is not None:
            return self.ollama_template, self.ollama_stop
        if not eos_token:
            raise ValueError(f"The {self.name} template ends turns with the tokenizer's EOS; pass "
                             "ollama(eos_token=tokenizer.eos_token) to fill it in.")
        fill = lambda text: text.replace(EOS_PLACEHOLDER, eos_token)  # noqa: E731
        return fill(self.ollama_template), tuple(dict.fromkeys(fill(s) for s in self.ollama_stop))


# --------------------------------------------------------------------------------------------
# Jinja bodies. Every line starts with a whitespace-trimming tag, so the output is exactly the
# quoted strings whatever the environment's trim settings. The generation block holds the reply
# and its turn-end token; the newline after the turn end stays outside (the model never has to
# produce it: generation stops at the turn end).
# --------------------------------------------------------------------------------------------

_CHATML_BODY = r"""
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
        {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3-Thinking-2507 without tools: the reasoning of turns after the last user query is kept
# (from ``reasoning_content`` or a ``<think>`` block in the content), earlier reasoning is dropped.
_QWEN3_THINKING_BODY = r"""
{%- set ns = namespace(last_query_index=messages|length - 1, searching=true) %}
{%- for message in messages[::-1] %}
    {%- set is_tool_result = message['content'].startswith('<tool_response>')
                             and message['content'].endswith('</tool_response>') %}
    {%- if ns.searching and message['role'] == 'user' and not is_tool_result %}
        {%- set ns.searching = false %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] != 'assistant' %}
        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
    {%- else %}
        {%- set reasoning_content = '' %}
        {%- if message['reasoning_content'] is string %}
            {%- set reasoning_content = message['reasoning_content'] %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                                               .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}
"""

_LLAMA3_BODY = r"""
{%- for message in messages %}
    {%- if loop.first %}
        {{- bos_token }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
        {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Llama 3.1 / 3.3 (and 3.2 with the same fixed date): the system header always carries the
# knowledge cut-off and ``date_string`` (default "26 Jul 2024", as the official template).
_LLAMA31_BODY = r"""
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\n' }}
{{- 'Today Date: ' + date_string + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
        {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Gemma 1/2/3: a system message becomes the start of the first user turn (Gemma 3's rule; the
# Gemma 1/2 templates refuse system messages instead).
_GEMMA_BODY = r"""
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('The gemma chat templates need user and assistant turns to alternate, starting with '
                              ~ 'user (after an optional system message); merge or drop the out-of-order '
                              ~ 'messages.') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}
        {{- message['content'] | trim + '<end_of_turn>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') }}
        {{- message['content'] | trim + '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct v0.1/v0.2; a system message starts the first user turn, followed by a
# blank line (Mistral's documented convention for these models).
_MISTRAL_BODY = r"""
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('The mistral chat template needs user and assistant turns to alternate, starting with '
                              ~ 'user (after an optional system message); merge or drop the out-of-order '
                              ~ 'messages.') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (first_user_prefix if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else %}
        {%- generation %}
        {{- message['content'] + eos_token }}
        {%- endgeneration %}
    {%- endif %}
{%- endfor %}
"""

# Phi-3.5 (Phi-3 renders an empty system message too; 3.5 skips it). The official template ends
# a finished conversation with ``eos_token``; once ``<|end|>`` is the EOS that would repeat it.
_PHI3_BODY = r"""
{%- for message in messages %}
    {%- if message['role'] == 'system' and message['content'] %}
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}
        {{- message['content'] + '<|end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- elif eos_token and eos_token != '<|end|>' %}
    {%- if messages and messages[-1]['role'] == 'assistant' %}
        {%- generation %}
        {{- eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- eos_token }}
    {%- endif %}
{%- endif %}
"""

_PHI4_BODY = r"""
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant<|im_sep|>' }}
        {%- generation %}
        {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_sep|>' }}
{%- endif %}
"""

_ZEPHYR_BODY = r"""
{%- for message in messages %}
    {{- '<|' + message['role'] + '|>\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
        {{- message['content'] + eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
"""


def _prefixed_turns_body(system_end: str, user: tuple[str, str], assistant: tuple[str, str],
                         prompt: str, system_start: str = "") -> str:
    """Body of the single-line formats (Alpaca, Vicuna, Unsloth's, {INPUT}/{OUTPUT} prompts):
    ``system_start + system + system_end``, then ``prefix + content + suffix`` per turn, the reply
    followed by ``eos_token``."""
    return (
        "\n{{- bos_token }}\n"
        "{%- if messages and messages[0]['role'] == 'system' %}\n"
        f"    {{{{- {_jinja_str(system_start) + ' + ' if system_start else ''}messages[0]['content'] + "
        f"{_jinja_str(system_end)} }}}}\n"
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n"
        "{%- for message in loop_messages %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        f"        {{{{- {_jinja_str(user[0])} + message['content'] + {_jinja_str(user[1])} }}}}\n"
        "    {%- else %}\n"
        f"        {{{{- {_jinja_str(assistant[0])} }}}}\n"
        "        {%- generation %}\n"
        "        {{- message['content'] + eos_token }}\n"
        "        {%- endgeneration %}\n"
        f"        {{{{- {_jinja_str(assistant[1])} }}}}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        f"    {{{{- {_jinja_str(prompt)} }}}}\n"
        "{%- endif %}\n"
    )


def _jinja_str(text: str) -> str:
    """``text`` as a Jinja string literal. JSON's escapes are the ones Jinja decodes, and
    non-ASCII stays raw so that Jinja's unicode-escape step round-trips it."""
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Ollama counterparts: Go templates in Ollama's ``.Messages`` form.
# --------------------------------------------------------------------------------------------

_CHATML_OLLAMA = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

_LLAMA3_OLLAMA = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

_LLAMA31_OLLAMA = """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ range $i, $_ := .Messages }}{{ if and (eq $i 0) (eq .Role "system") }}{{ .Content }}{{ end }}{{ end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- if not (and (eq $i 0) (eq .Role "system")) }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

_GEMMA_OLLAMA = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""

_MISTRAL_OLLAMA = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}{__EOS_TOKEN__}
{{- end }}
{{- end }}"""

_PHI3_OLLAMA = """{{- range .Messages }}
{{- if or (ne .Role "system") .Content }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""

_PHI4_OLLAMA = """{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>
{{- end }}<|im_start|>assistant<|im_sep|>"""

_ZEPHYR_OLLAMA = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}{__EOS_TOKEN__}
{{ end }}<|assistant|>
"""


def _prefixed_turns_ollama(system_end: str, user: tuple[str, str], assistant: tuple[str, str],
                           prompt: str, system_start: str = "") -> str:
    """The Go template of ``_prefixed_turns_body`` with the same pieces."""
    return (
        "{{- range .Messages }}\n"
        '{{- if eq .Role "system" }}' + system_start + "{{ .Content }}" + system_end
        + '{{ else if eq .Role "user" }}' + user[0] + "{{ .Content }}" + user[1]
        + '{{ else if eq .Role "assistant" }}' + assistant[0] + "{{ .Content }}" + EOS_PLACEHOLDER + assistant[1]
        + "{{ end }}\n"
        "{{- end }}" + prompt
    )


def _prefixed_turns(name: str, system_end: str, user: tuple[str, str], assistant: tuple[str, str],
                    prompt: str, default_system_message: str, stops: tuple[str, ...], source: str) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        body=_prefixed_turns_body(system_end, user, assistant, prompt),
        stop_token=None,
        adds_bos=True,
        default_system_message=default_system_message,
        ollama_template=_prefixed_turns_ollama(system_end, user, assistant, prompt),
        ollama_stop=(EOS_PLACEHOLDER, *stops),
        system_first_only=True,
        source=source,
    )


_CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
_LLAMA3_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_GEMMA_STOPS = ("<start_of_turn>", "<end_of_turn>")


def _gemma(name: str, aliases: tuple[str, ...], source: str) -> ChatTemplate:
    return ChatTemplate(name=name, body=_GEMMA_BODY, stop_token="<end_of_turn>", adds_bos=True,
                        default_system_message=None, ollama_template=_GEMMA_OLLAMA,
                        ollama_stop=_GEMMA_STOPS, aliases=aliases, system_first_only=True, source=source)


def _chatml_family(name: str, aliases: tuple[str, ...], default_system_message: str | None,
                   source: str) -> ChatTemplate:
    return ChatTemplate(name=name, body=_CHATML_BODY, stop_token="<|im_end|>", adds_bos=False,
                        default_system_message=default_system_message, ollama_template=_CHATML_OLLAMA,
                        ollama_stop=_CHATML_STOPS, aliases=aliases, source=source)


_TEMPLATE_LIST = [
    _chatml_family("chatml", (), None, "ChatML"),
    ChatTemplate(
        name="llama-3", body=_LLAMA3_BODY, stop_token="<|eot_id|>", adds_bos=True,
        default_system_message=None, ollama_template=_LLAMA3_OLLAMA, ollama_stop=_LLAMA3_STOPS,
        aliases=("llama3",), source="meta-llama/Meta-Llama-3-8B-Instruct",
    ),
    ChatTemplate(
        name="llama-3.1", body=_LLAMA31_BODY, stop_token="<|eot_id|>", adds_bos=True,
        default_system_message=None, ollama_template=_LLAMA31_OLLAMA,
        ollama_stop=(*_LLAMA3_STOPS, "<|eom_id|>"),
        aliases=("llama-31", "llama3.1", "llama-3.2", "llama-32", "llama3.2", "llama-3.3", "llama-33", "llama3.3"),
        source="meta-llama/Llama-3.1-8B-Instruct without tools (3.3 is identical; 3.2 prints today's date)",
    ),
    _chatml_family("qwen-2.5", ("qwen25", "qwen2.5", "qwen-25"),
                   "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                   "Qwen/Qwen2.5-7B-Instruct without tools"),
    _chatml_family("qwen-3", ("qwen3", "qwen-3-instruct", "qwen3-instruct"), None,
                   "Qwen/Qwen3-4B-Instruct-2507 without tools"),
    ChatTemplate(
        name="qwen-3-thinking", body=_QWEN3_THINKING_BODY, stop_token="<|im_end|>", adds_bos=False,
        default_system_message=None,
        ollama_template=_CHATML_OLLAMA + "<think>\n", ollama_stop=_CHATML_STOPS,
        aliases=("qwen3-thinking",), source="Qwen/Qwen3-4B-Thinking-2507 without tools",
    ),
    ChatTemplate(
        name="mistral", body=_MISTRAL_BODY, stop_token=None, adds_bos=True, default_system_message=None,
        ollama_template=_MISTRAL_OLLAMA, ollama_stop=(EOS_PLACEHOLDER, "[INST]", "[/INST]"),
        system_first_only=True, source="mistralai/Mistral-7B-Instruct-v0.1",
    ),
    _gemma("gemma", (), "google/gemma-7b-it"),
    _gemma("gemma2", ("gemma-2",), "google/gemma-2-9b-it"),
    _gemma("gemma-3", ("gemma3",), "google/gemma-3-4b-it, text only"),
    ChatTemplate(
        name="phi-3", body=_PHI3_BODY, stop_token="<|end|>", adds_bos=False, default_system_message=None,
        ollama_template=_PHI3_OLLAMA, ollama_stop=("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
        aliases=("phi3", "phi-35", "phi-3.5", "phi3.5"), source="microsoft/Phi-3.5-mini-instruct",
    ),
    ChatTemplate(
        name="phi-4", body=_PHI4_BODY, stop_token="<|im_end|>", adds_bos=False, default_system_message=None,
        ollama_template=_PHI4_OLLAMA, ollama_stop=("<|im_start|>", "<|im_end|>", "<|im_sep|>"),
        aliases=("phi4",), source="microsoft/phi-4",
    ),
    _prefixed_turns(
        "alpaca", "\n\n", ("### Instruction:\n", "\n\n"), ("### Response:\n", "\n\n"), "### Response:\n",
        "Below are some instructions that describe some tasks. Write responses that appropriately "
        "complete each request.", ("### Instruction:", "### Response:"),
        "Stanford Alpaca, multi-turn as in Unsloth",
    ),
    _prefixed_turns(
        "vicuna", " ", ("USER: ", " "), ("ASSISTANT: ", ""), "ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.", ("USER:", "ASSISTANT:"),
        "FastChat vicuna_v1.1",
    ),
    ChatTemplate(
        name="zephyr", body=_ZEPHYR_BODY, stop_token=None, adds_bos=False, default_system_message=None,
        ollama_template=_ZEPHYR_OLLAMA, ollama_stop=(EOS_PLACEHOLDER, "<|system|>", "<|user|>", "<|assistant|>"),
        source="HuggingFaceH4/zephyr-7b-beta",
    ),
    _prefixed_turns(
        "unsloth", "\n", (">>> User: ", "\n"), (">>> Assistant: ", "\n"), ">>> Assistant: ",
        "You are a helpful assistant to the user", (">>> User:",), "Unsloth's own format",
    ),
]

CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATE_LIST}
_BY_NAME: dict[str, ChatTemplate] = {
    name: t for t in _TEMPLATE_LIST for name in (t.name, *t.aliases)
}


# --------------------------------------------------------------------------------------------
# Building the full Jinja template: identity comment + preludes + body.
# --------------------------------------------------------------------------------------------

def build_jinja(spec: ChatTemplate, system_message: str | None = None,
                mapping: dict[str, str] | None = None) -> str:
    """The Hugging Face template for ``spec``: its identity comment, the preludes (mapping, role
    checks, default system message) and the body."""
    system_message = spec.default_system_message if system_message is None else system_message
    mapping = {**DEFAULT_MAPPING, **(mapping or {})}
    header = {"name": spec.name, "system_message": system_message, "stop_token": spec.stop_token}
    if spec.prompt is not None:
        header["prompt"] = spec.prompt
    if mapping != DEFAULT_MAPPING:
        header["mapping"] = mapping
    parts = [_header_comment(header), _tools_guard(spec.name)]
    if mapping != DEFAULT_MAPPING:
        parts.append(_mapping_prelude(mapping))
    parts.append(_role_checks(spec.name, spec.system_first_only))  # before: indices are the caller's
    if system_message is not None:
        parts.append(_system_prelude(system_message))
    return "".join(parts) + spec.body.strip("\n") + "\n"


def _header_comment(header: dict) -> str:
    # '#' only occurs inside JSON strings, so escaping '#}' there keeps the comment closed.
    text = json.dumps(header, ensure_ascii=False).replace("#}", "#\\u007d")
    return f"{_HEADER}{text} -#}}\n"


def _tools_guard(name: str) -> str:
    message = (f"The {name} chat template renders text conversations only; for tool calling use the "
               "model's own chat template (tokenizer.chat_template before get_chat_template).")
    return f"{{%- if tools %}}{{{{- raise_exception({_jinja_str(message)}) }}}}{{%- endif %}}\n"


def _mapping_prelude(mapping: dict[str, str]) -> str:
    """Rewrite ``messages`` into role/content dicts; messages already in that form pass through."""
    roles = {mapping["user"]: "user", mapping["assistant"]: "assistant", mapping.get("system", "system"): "system"}
    role_key, content_key = _jinja_str(mapping["role"]), _jinja_str(mapping["content"])
    return (
        f"{{%- set _roles = {json.dumps(roles, ensure_ascii=False)} %}}\n"
        "{%- set _ns = namespace(messages=[]) %}\n"
        "{%- for m in messages %}\n"
        f"    {{%- set _role = m[{role_key}] if {role_key} in m else m['role'] %}}\n"
        f"    {{%- set _content = m[{content_key}] if {content_key} in m else m['content'] %}}\n"
        "    {%- set _ns.messages = _ns.messages + [dict(m, role=_roles.get(_role, _role), content=_content)] %}\n"
        "{%- endfor %}\n"
        "{%- set messages = _ns.messages %}\n"
    )


def _system_prelude(system_message: str) -> str:
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}\n"
        f"    {{%- set messages = [{{'role': 'system', 'content': {_jinja_str(system_message)}}}] + messages %}}\n"
        "{%- endif %}\n"
    )


def _role_checks(name: str, system_first_only: bool) -> str:
    where = " (system only as the first one)" if system_first_only else ""
    late_system = "or (message['role'] == 'system' and not loop.first) " if system_first_only else ""
    unknown = (f"'The {name} chat template cannot render message ' ~ loop.index0 ~ ' with role \"' ~ "
               f"message['role'] ~ '\"; it takes system, user and assistant messages{where} "
               "(rename roles with the mapping argument of get_chat_template, or standardize_sharegpt).'")
    not_text = (f"'The {name} chat template takes text content only, but message ' ~ loop.index0 ~ "
                "' has content of another type; join its parts into one string.'")
    return (
        "{%- for message in messages %}\n"
        f"    {{%- if message['role'] not in ['system', 'user', 'assistant'] {late_system}%}}\n"
        f"        {{{{- raise_exception({unknown}) }}}}\n"
        "    {%- elif message['content'] is not string %}\n"
        f"        {{{{- raise_exception({not_text}) }}}}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    )


def inference_template(template: str) -> str:
    """``template`` as an inference runtime gets it (the GGUF's ``tokenizer.chat_template``).

    Runtimes send role/content messages, so a ShareGPT key mapping given to ``get_chat_template``
    has nothing to map there; its prelude is dropped (with the mapping in the identity comment):
    it builds messages with ``dict(m, role=...)``, which llama.cpp's engine (what Ollama uses for
    a GGUF's template by default) has, but not every C++ Jinja engine does. Also without
    ``{% generation %}`` tags. Everything else renders exactly as before.
    """
    header = _read_header(template)
    if header is not None and "mapping" in header:
        own_header, prelude = _header_comment(header), _mapping_prelude(header["mapping"])
        if template.startswith(own_header) and prelude in template:  # not edited since get_chat_template
            plain = {key: value for key, value in header.items() if key != "mapping"}
            template = _header_comment(plain) + template[len(own_header):].replace(prelude, "", 1)
    return without_generation_markers(template)


def without_generation_markers(template: str) -> str:
    """``template`` without ``{% generation %}`` tags, for runtimes that do not know them (the
    tags are a transformers extension; they change no rendered text)."""
    return _GENERATION_TAG_RE.sub("", template)


# --------------------------------------------------------------------------------------------
# Prompt templates: Unsloth's {INPUT}/{OUTPUT}(/{SYSTEM}) strings.
# --------------------------------------------------------------------------------------------

PROMPT_TEMPLATE_NAME = "prompt"
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_]*)\}")
_PLACEHOLDERS = ("SYSTEM", "INPUT", "OUTPUT")


def is_prompt_template(text: str) -> bool:
    """A string with placeholders in braces (template names have none)."""
    return bool(_PLACEHOLDER_RE.search(text))


def _check_placeholders(text: str) -> None:
    found = _PLACEHOLDER_RE.findall(text)
    unknown = sorted({name for name in found if name not in _PLACEHOLDERS})
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown)
        raise ValueError(f"The prompt template has {shown}; it takes {{INPUT}} (the user's message), {{OUTPUT}} "
                         "(the reply) and optionally {SYSTEM}, each once, in that order "
                         "(merge dataset columns into one message with to_sharegpt first).")
    counts = {name: found.count(name) for name in _PLACEHOLDERS}
    if counts["INPUT"] != 1 or counts["OUTPUT"] != 1 or counts["SYSTEM"] > 1:
        raise ValueError(f"The prompt template must have {{INPUT}} and {{OUTPUT}} once each and {{SYSTEM}} at most "
                         f"once; it has INPUT x{counts['INPUT']}, OUTPUT x{counts['OUTPUT']}, SYSTEM x{counts['SYSTEM']}.")
    order = [name for name in found if name in _PLACEHOLDERS]
    if order != [name for name in _PLACEHOLDERS if name in order]:
        raise ValueError("The prompt template must put {SYSTEM} (if any) before {INPUT}, and {INPUT} before "
                         f"{{OUTPUT}}; it has {', '.join('{' + n + '}' for n in order)}.")


def prompt_template_spec(prompt: str, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
    """The chat format of an ``{INPUT}``/``{OUTPUT}`` prompt (Unsloth's custom templates), for any
    number of turns.

    The prompt is one exchange: ``[header][user prefix]{INPUT}[middle]{OUTPUT}[turn end]``. Each
    turn renders ``user prefix + message + user suffix``, then ``reply prefix + reply + EOS + turn
    end``, then the separator that precedes the next turn; ``add_generation_prompt`` adds the
    reply prefix. The middle splits into the user suffix (the turn end when it starts with it,
    else its leading newlines) and the reply prefix. Which text is the header and which the user
    prefix: with ``{SYSTEM}``, the text before it opens the system block, which ends with the
    turn end when the text after ``{SYSTEM}`` starts with it (Llama 3 style: turns then follow
    each other directly) or else with its leading newlines (then also the separator between
    turns); without ``{SYSTEM}``, text before the last blank line ahead of
    ``{INPUT}`` is the default system message (Alpaca style; a conversation's own system message
    replaces it) and the blank line separates turns. The template writes the tokenizer's
    ``bos_token`` first and ``eos_token`` after every reply, so a prompt that starts with
    ``bos_token`` or has ``eos_token`` right after ``{OUTPUT}`` does not get them twice.
    """
    _check_placeholders(prompt)
    text = prompt[len(bos_token):] if bos_token and prompt.startswith(bos_token) else prompt
    before_input, rest = text.split("{INPUT}")
    middle, turn_end = rest.split("{OUTPUT}")
    tail = turn_end[len(eos_token):] if eos_token and turn_end.startswith(eos_token) else turn_end
    system_start, default_system = "", None
    if "{SYSTEM}" in before_input:
        system_start, after_system = before_input.split("{SYSTEM}")
        if turn_end and after_system.startswith(turn_end):  # the system block ends as a turn does
            system_end, user_prefix, separator = turn_end, after_system[len(turn_end):], ""
        else:
            user_prefix = after_system.lstrip("\n")
            system_end = separator = after_system[:len(after_system) - len(user_prefix)]
    else:
        cut = before_input.rfind("\n\n")
        if cut > 0 and before_input[:cut].strip():
            default_system, user_prefix = before_input[:cut], before_input[cut + 2:]
            system_end = separator = "\n\n"
        else:
            user_prefix = before_input
            separator = middle[:len(middle) - len(middle.lstrip("\n"))]
            system_end = separator
    # The middle closes the user's turn (with the turn end, or a newline run) and opens the reply.
    if turn_end and middle.startswith(turn_end):
        user_suffix = turn_end
    else:
        user_suffix = middle[:len(middle) - len(middle.lstrip("\n"))]
    assistant_prefix = middle[len(user_suffix):]
    pieces = dict(system_end=system_end, user=(user_prefix, user_suffix), assistant=(assistant_prefix, tail + separator),
                  prompt=assistant_prefix, system_start=system_start)
    stops = tuple(dict.fromkeys(p.strip() for p in (user_prefix, assistant_prefix) if p.strip()))
    return ChatTemplate(
        name=PROMPT_TEMPLATE_NAME, body=_prefixed_turns_body(**pieces), stop_token=None, adds_bos=True,
        default_system_message=default_system, ollama_template=_prefixed_turns_ollama(**pieces),
        ollama_stop=(EOS_PLACEHOLDER, *stops), system_first_only=True,
        source="a {INPUT}/{OUTPUT} prompt (Unsloth's custom chat templates)", prompt=prompt,
    )


# --------------------------------------------------------------------------------------------
# Looking templates up.
# --------------------------------------------------------------------------------------------

def chat_template_spec(name_or_tokenizer: Any) -> ChatTemplate:
    """The record for a template name (or alias), or for the template a tokenizer got from
    ``get_chat_template`` (also after ``save_pretrained``/``from_pretrained``), with the system
    message it was given."""
    if isinstance(name_or_tokenizer, str):
        return lookup_chat_template(name_or_tokenizer)
    template = getattr(name_or_tokenizer, "chat_template", None)
    header = _read_header(template)
    if header is None:
        raise ValueError("This tokenizer's chat template was not set by get_chat_template; call "
                         "get_chat_template(tokenizer, 'name') first, or pass the template name.")
    if header["name"] == PROMPT_TEMPLATE_NAME and "prompt" in header:
        spec = prompt_template_spec(header["prompt"], getattr(name_or_tokenizer, "bos_token", None),
                                    getattr(name_or_tokenizer, "eos_token", None))
        return replace(spec, default_system_message=header["system_message"])
    if header["name"] not in CHAT_TEMPLATES:  # a custom (template, eos) pair
        return _custom_spec(template, header["stop_token"], header["system_message"])
    return replace(CHAT_TEMPLATES[header["name"]], default_system_message=header["system_message"])


def lookup_chat_template(name: str) -> ChatTemplate:
    """The template called ``name`` (any known alias, any case); one sentence naming the known ones
    (and the closest) otherwise."""
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    known = sorted(_BY_NAME)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown chat template {name!r}.{hint} Known templates: {', '.join(known)}; "
                     "or pass a (jinja_template, eos_token) tuple for your own.")


def _read_header(template: Any) -> dict | None:
    match = _HEADER_RE.match(template) if isinstance(template, str) else None
    return json.loads(match.group(1)) if match else None


def _custom_spec(template: str, stop_token: str | None, system_message: str | None = None) -> ChatTemplate:
    return ChatTemplate(name="custom", body=template, stop_token=stop_token, adds_bos="bos_token" in template,
                        default_system_message=system_message, ollama_template="", ollama_stop=())


# --------------------------------------------------------------------------------------------
# get_chat_template
# --------------------------------------------------------------------------------------------

def get_chat_template(
    tokenizer,
    chat_template: str | tuple[str, str] = "chatml",
    mapping: dict[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Give ``tokenizer`` the chat template ``chat_template``: a name, a ``(jinja, eos_token)``
    pair, or a prompt with ``{INPUT}``, ``{OUTPUT}`` and optionally ``{SYSTEM}`` (see
    ``prompt_template_spec``; the tokenizer then also gets ``_ollama_modelfile``).

    ``mapping`` names the keys and role values of the dataset's messages (ShareGPT:
    ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}``).
    ``map_eos_token`` makes the template's turn-end token the tokenizer's EOS (added as a
    special token when the vocabulary lacks it). ``system_message`` replaces the template's
    default system message, or gives one to a template without a default. The tokenizer is
    changed in place and returned, as Unsloth's helper returns it.
    """
    if not isinstance(map_eos_token, bool):
        raise TypeError(f"map_eos_token must be True or False, got {map_eos_token!r}.")
    mapping = _check_mapping(mapping)
    if isinstance(chat_template, (tuple, list)):
        spec = _custom_from_tuple(chat_template, system_message)
        template = _custom_jinja(spec, chat_template[0], system_message, mapping)
    elif isinstance(chat_template, str) and is_prompt_template(chat_template):
        spec = prompt_template_spec(chat_template, tokenizer.bos_token, tokenizer.eos_token)
        template = build_jinja(spec, system_message, mapping)
    elif isinstance(chat_template, str):
        spec = lookup_chat_template(chat_template)
        template = build_jinja(spec, system_message, mapping)
    else:
        raise TypeError("chat_template must be a template name such as 'llama-3' or a "
                        f"(jinja_template, eos_token) tuple, got {type(chat_template).__name__}.")
    if map_eos_token and spec.stop_token is not None:
        _map_eos_token(tokenizer, spec.stop_token)
    tokenizer.chat_template = template
    if spec.prompt is not None:
        _attach_ollama_modelfile(tokenizer)
    return tokenizer


def _attach_ollama_modelfile(tokenizer) -> None:
    """Unsloth's ``tokenizer._ollama_modelfile``: the Modelfile ``save_pretrained_gguf`` writes,
    with ``{__FILE_LOCATION__}`` where the GGUF's path goes."""
    from .save.ollama import build_modelfile

    try:
        text = build_modelfile(tokenizer, "model.gguf")
    except ValueError as error:  # e.g. text Ollama's Modelfile syntax cannot hold: training still works
        logger.warning("No Ollama Modelfile for this prompt template: %s", error)
        tokenizer._ollama_modelfile = None
        return
    tokenizer._ollama_modelfile = text.replace("FROM ./model.gguf", "FROM {__FILE_LOCATION__}", 1)


def _check_mapping(mapping: dict[str, str] | None) -> dict[str, str]:
    mapping = {**DEFAULT_MAPPING, **(mapping or {})}
    unknown = sorted(set(mapping) - {*DEFAULT_MAPPING, "system"})
    if unknown:
        raise ValueError(f"mapping has unknown keys {unknown}; it takes role, content, user, assistant "
                         "and system, e.g. {'role': 'from', 'content': 'value', 'user': 'human', "
                         "'assistant': 'gpt'}.")
    bad = sorted(k for k, v in mapping.items() if not isinstance(v, str) or not v)
    if bad:
        raise ValueError(f"mapping values must be non-empty strings; fix the entries for {bad}.")
    return mapping


def _custom_from_tuple(chat_template, system_message: str | None) -> ChatTemplate:
    if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
        raise ValueError("A custom chat_template must be a (jinja_template, eos_token) pair of strings; "
                         "use eos_token='eos_token' to end turns with the tokenizer's own EOS.")
    template, stop = chat_template
    if not _GENERATION_TAG_RE.search(template):
        logger.warning("The custom chat template has no {% generation %} markers, so "
                       "return_assistant_tokens_mask (TRL's assistant_only_loss) will not work with it.")
    return _custom_spec(template, None if stop == "eos_token" else stop, system_message)


def _custom_jinja(spec: ChatTemplate, template: str, system_message: str | None,
                  mapping: dict[str, str]) -> str:
    """A custom template keeps its own role rules; it only gets the identity comment and the
    mapping / system-message preludes."""
    header = {"name": "custom", "system_message": system_message, "stop_token": spec.stop_token}
    if mapping != DEFAULT_MAPPING:
        header["mapping"] = mapping  # so inference_template can take the prelude out again
    parts = [_header_comment(header)]
    if mapping != DEFAULT_MAPPING:
        parts.append(_mapping_prelude(mapping))
    if system_message is not None:
        parts.append(_system_prelude(system_message))
    return "".join(parts) + template


def _map_eos_token(tokenizer, stop_token: str) -> None:
    """Make ``stop_token`` the EOS through the tokenizer API, keeping the pad token distinct."""
    if tokenizer.eos_token == stop_token:
        return
    old_eos, size_before = tokenizer.eos_token, len(tokenizer)
    tokenizer.add_special_tokens({"eos_token": stop_token})  # keeps its id when it is in the vocab
    if tokenizer.pad_token is None or tokenizer.pad_token == stop_token:
        _choose_pad_token(tokenizer, old_eos)
    if len(tokenizer) > size_before:
        added = tokenizer.convert_ids_to_tokens(list(range(size_before, len(tokenizer))))
        logger.warning(
            "get_chat_template added %s to the vocabulary (now %d tokens): if the model has fewer "
            "embedding rows, call model.resize_token_embeddings(len(tokenizer)), and train the new rows "
            "(e.g. modules_to_save=['embed_tokens', 'lm_head']) or the model cannot learn to end its turns.",
            ", ".join(repr(t) for t in added), len(tokenizer),
        )


def stop_on_tokenizer_eos(generation_config, tokenizer) -> bool:
    """Add the tokenizer's EOS to ``generation_config.eos_token_id``; True when it was missing.

    ``generate`` stops on the generation config's ids alone, and ``get_chat_template`` may have
    made the template's turn end (``<|eot_id|>``, ``<|im_end|>``) the tokenizer's EOS after the
    model was loaded: without this, a chat reply runs on past its turn. The config's own ids stay
    (a base model may still end text with its original EOS).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if generation_config is None or eos is None:
        return False
    current = generation_config.eos_token_id
    ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    if eos in ids:
        return False
    generation_config.eos_token_id = [*ids, eos] if ids else eos
    return True


def _choose_pad_token(tokenizer, old_eos: str | None) -> None:
    """A pad token other than the new EOS: padded EOS positions would teach the model never to stop."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token
    choices = [t for t in _PAD_CANDIDATES if t in vocab] + [tokenizer.unk_token, old_eos]
    choice = next((t for t in choices if t is not None and t != eos), None)
    if choice is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    else:
        tokenizer.pad_token = choice


# --------------------------------------------------------------------------------------------
# Datasets: ShareGPT <-> role/content, Alpaca-style tables -> conversations, rendering to text.
# --------------------------------------------------------------------------------------------

DEFAULT_ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user", "human", "input"),
    "assistant": ("assistant", "gpt", "model", "bot", "output", "chatgpt", "bard", "bing"),
    "tool": ("tool", "function_response", "observation", "ipython"),
}
_CONVERSATION_COLUMNS = ("conversations", "messages")


def standardize_sharegpt(dataset, aliases: dict[str, list[str]] | None = None):
    """ShareGPT messages (``{"from": "human", "value": ...}``) -> ``{"role": "user", "content": ...}``.

    The conversation column (``conversations``, else ``messages``) keeps its name, as in Unsloth.
    ``aliases`` adds dataset role names per standard role, e.g. ``{"user": ["customer"]}``; names
    are matched case-insensitively.
    """
    column = _conversation_column(dataset)
    lookup = _alias_lookup(aliases)

    def standardize(batch, indices):
        return {column: [_standard_conversation(convo, row, lookup, column)
                         for convo, row in zip(batch[column], indices)]}

    return dataset.map(standardize, batched=True, with_indices=True, desc="Standardizing ShareGPT")


def _conversation_column(dataset, column: str | None = None) -> str:
    names = list(dataset.column_names)
    if column is not None:
        if column not in names:
            raise ValueError(f"The dataset has no column {column!r}; its columns are {names}.")
        return column
    found = next((c for c in _CONVERSATION_COLUMNS if c in names), None)
    if found is None:
        raise ValueError(f"The dataset has no 'conversations' or 'messages' column; its columns are "
                         f"{names}. Rename the conversation column, or build one with to_sharegpt.")
    return found


def _alias_lookup(aliases: dict[str, list[str]] | None) -> dict[str, str]:
    table: dict[str, set[str]] = {role: set(names) for role, names in DEFAULT_ROLE_ALIASES.items()}
    for role, names in (aliases or {}).items():
        names = [names] if isinstance(names, str) else list(names)
        table.setdefault(role, set()).update(names)
    lookup: dict[str, str] = {}
    for role, names in table.items():
        for name in names:
            key = name.strip().lower()
            if lookup.get(key, role) != role:
                raise ValueError(f"The role name {name!r} is an alias of both {lookup[key]!r} and {role!r}; "
                                 "list it under one role only in aliases.")
            lookup[key] = role
    return lookup


def _standard_conversation(convo, row: int, lookup: dict[str, str], column: str) -> list[dict[str, str]]:
    if not isinstance(convo, list):
        raise ValueError(f"Row {row} of column {column!r} is not a list of messages; each row must "
                         "hold a conversation such as [{'from': 'human', 'value': ...}, ...].")
    return [_standard_message(message, row, lookup, column) for message in convo]


def _standard_message(message, row: int, lookup: dict[str, str], column: str) -> dict[str, str]:
    role_key = next((k for k in ("from", "role") if k in message and message[k] is not None), None)
    content_key = next((k for k in ("value", "content") if k in message and message[k] is not None), None)
    if role_key is None or content_key is None:
        keys = sorted(k for k, v in message.items() if v is not None)
        raise ValueError(f"Row {row} of column {column!r} has a message with keys {keys}; ShareGPT "
                         "messages need 'from' and 'value' (or 'role' and 'content').")
    name = message[role_key]
    role = lookup.get(str(name).strip().lower())
    if role is None:
        raise ValueError(f"Row {row} of column {column!r} has the unknown role {name!r}; map it with "
                         f"aliases, e.g. standardize_sharegpt(dataset, aliases={{'user': [{name!r}]}}).")
    return {"role": role, "content": message[content_key]}


def to_sharegpt(
    dataset,
    merged_prompt: str = "{instruction}[[\nYour input is:\n{input}]]",
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """Alpaca-style rows -> ShareGPT ``conversations`` (``human`` then ``gpt``), as Unsloth's helper.

    ``merged_prompt`` builds the user turn from columns: ``{column}`` is replaced by the value,
    and an optional ``[[...]]`` block is dropped when a column inside it is empty. With
    ``conversation_extension=n`` each row becomes ``n`` randomly drawn exchanges in a row.
    """
    names = list(dataset.column_names)
    if output_column_name not in names:
        raise ValueError(f"The dataset has no output column {output_column_name!r}; its columns are "
                         f"{names}. Pass output_column_name=... naming the answer column.")
    pieces = _parse_merged_prompt(merged_prompt, names)
    if conversation_extension < 1:
        raise ValueError(f"conversation_extension must be 1 or more, got {conversation_extension}.")

    if "conversations" in names:
        raise ValueError("The dataset already has a 'conversations' column; it is probably ShareGPT "
                         "already, so use standardize_sharegpt instead of to_sharegpt.")

    def convert(batch):
        rows = range(len(batch[output_column_name]))
        users = [_fill_prompt(pieces, {k: batch[k][i] for k in batch}) for i in rows]
        convos = [[{"from": "human", "value": u}, {"from": "gpt", "value": _text(a)}]
                  for u, a in zip(users, batch[output_column_name])]
        kept = {} if remove_unused_columns else {merged_column_name: users}  # Unsloth keeps it then
        return {**kept, "conversations": convos}

    dataset = dataset.map(convert, batched=True, remove_columns=names if remove_unused_columns else None,
                          desc="Converting to ShareGPT")
    return _extend_conversations(dataset, conversation_extension, random_state)


_FIELD_RE = re.compile(r"\{([^{}]+)\}")
_OPTIONAL_RE = re.compile(r"\[\[(.*?)\]\]", flags=re.DOTALL)


def _parse_merged_prompt(merged_prompt: str, names: list[str]) -> list[tuple[str, bool]]:
    """``merged_prompt`` as ``(text, optional)`` pieces, after checking every column exists."""
    missing = [c for c in dict.fromkeys(_FIELD_RE.findall(merged_prompt)) if c not in names]
    if missing:
        raise ValueError(f"merged_prompt names the column(s) {missing}, which the dataset lacks; its "
                         f"columns are {names}.")
    pieces, position = [], 0
    for match in _OPTIONAL_RE.finditer(merged_prompt):
        if not _FIELD_RE.search(match.group(1)):
            raise ValueError(f"The optional block [[{match.group(1)}]] in merged_prompt names no "
                             "{column}; an optional block must contain at least one.")
        pieces += [(merged_prompt[position:match.start()], False), (match.group(1), True)]
        position = match.end()
    return [p for p in pieces + [(merged_prompt[position:], False)] if p[0]]


def _fill_prompt(pieces: list[tuple[str, bool]], row: dict[str, Any]) -> str:
    out = []
    for text, optional in pieces:
        fields = _FIELD_RE.findall(text)
        if optional and any(_text(row[f]) == "" for f in fields):
            continue
        out.append(_FIELD_RE.sub(lambda m: _text(row[m.group(1)]), text))
    return "".join(out)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _extend_conversations(dataset, conversation_extension: int, random_state: int):
    """Row i gets its own exchange followed by row i of ``n - 1`` seeded shuffles (Unsloth's recipe)."""
    if conversation_extension == 1:
        return dataset
    shuffles = [dataset["conversations"]] + [
        dataset.shuffle(seed=random_state + j)["conversations"] for j in range(1, conversation_extension)
    ]
    merged = [sum(parts, []) for parts in zip(*shuffles)]
    return dataset.map(lambda batch, rows: {"conversations": [merged[i] for i in rows]}, batched=True,
                       with_indices=True, desc="Extending conversations")


def apply_chat_template(
    dataset,
    tokenizer,
    chat_template: str | tuple[str, str] | None = None,
    default_system_message: str | None = None,
    column: str | None = None,
    output_column: str = "text",
):
    """Render each conversation to a ``text`` column (Unsloth's helper of that name).

    ``chat_template`` (a name or ``(jinja, eos)`` tuple) is first set on the tokenizer with
    ``get_chat_template``; ``None`` keeps the tokenizer's template. ``default_system_message``
    is put in front of conversations that have no system message. When the template starts with
    a BOS the tokenizer adds again on encoding, the text leaves it out, so that tokenizing the
    text (as SFTTrainer does) gives one BOS, not two.
    """
    if chat_template is not None:
        get_chat_template(tokenizer, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; pass chat_template='llama-3' (or another "
                         "name) or call get_chat_template first.")
    column = _conversation_column(dataset, column)
    bos = bos_added_on_encode(tokenizer)

    def render(batch, indices):
        return {output_column: [_render(tokenizer, convo, row, column, default_system_message, bos)
                                for convo, row in zip(batch[column], indices)]}

    return dataset.map(render, batched=True, with_indices=True, desc="Applying chat template")


def _render(tokenizer, convo, row: int, column: str, system_message: str | None, bos: str | None) -> str:
    if system_message is not None and not (convo and convo[0].get("role") == "system"):
        convo = [{"role": "system", "content": system_message}, *convo]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False)
    except Exception as error:  # the template's own message says what is wrong with the row
        raise ValueError(f"Row {row} of column {column!r} could not be rendered: {error}") from error
    return text[len(bos):] if bos and text.startswith(bos) else text


def bos_added_on_encode(tokenizer) -> str | None:
    """The BOS token when encoding plain text already adds it, else None (also None for a
    processor that cannot encode plain text)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a processor wants other inputs: it adds no BOS to our texts
        return None
    return tokenizer.bos_token if ids and ids[0] == bos_id else None


# Unsloth's notebooks import it from here (``from unsloth.chat_templates import train_on_responses_only``).
from .responses_only import train_on_responses_only  # noqa: E402,F401
