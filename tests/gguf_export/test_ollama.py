"""Ollama export: the Go templates render what the Jinja templates render, the Modelfile gets the
template the tokenizer actually uses, and the Modelfile text is what Ollama's parser reads back.

The Go side runs ``ollama_render/main.go``, which executes templates with Go's ``text/template``
under Ollama's contract (``template/template.go`` and the SYSTEM handling of ``server/routes.go``).
It is built once per session; without ``go`` on PATH those tests are skipped (``make test``
installs golang-go).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from unsloth_like.chat_templates import CHAT_TEMPLATES, build_jinja, get_chat_template, without_generation_markers
from unsloth_like.save import ollama
from unsloth_like.save.ollama import build_modelfile, ollama_template_for, write_modelfile

from ..prompt_templates import PROMPT_TEMPLATES

GO_SOURCE = Path(__file__).parent / "ollama_render" / "main.go"

SYSTEM = {"role": "system", "content": "Be brief.\nNo markdown."}
U1 = {"role": "user", "content": "Hi! Use {{ braces }} & <b>tags</b>."}
A1 = {"role": "assistant", "content": "Hello.\nHow can I help?"}
U2 = {"role": "user", "content": 'Say "café" ☕ twice.'}
CONVERSATIONS = {
    "one turn": [U1],
    "system, one turn": [SYSTEM, U1],
    "multi-turn": [U1, A1, U2],
    "system, multi-turn": [SYSTEM, U1, A1, U2],
}
OTHER_DEFAULT = "Answer in French."  # the default system message for records without one
ZOO_TOKENIZERS = ("mistral", "llama")  # "spm" (<s>, </s>) and "llama3" (<|begin_of_text|>, <|end_of_text|>)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def load(zoo_cache):
    """A fresh zoo tokenizer per call (get_chat_template changes the one it is given)."""
    from transformers import AutoTokenizer

    from unsloth_like.testing.zoo import zoo_model_dir

    return lambda name: AutoTokenizer.from_pretrained(zoo_model_dir(name, cache_dir=zoo_cache))


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """``render(jobs) -> [(output, error)]``: one Go process renders a whole batch."""
    if shutil.which("go") is None:
        pytest.skip("Go is not on PATH (make test installs golang-go); the Ollama template rendering "
                    "checks need it to run text/template")
    binary = tmp_path_factory.mktemp("ollama-render") / "ollama_render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": ""}
    if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
        env["GOCACHE"] = str(tmp_path_factory.mktemp("go-cache"))  # go refuses to build without one
    built = subprocess.run(["go", "build", "-o", str(binary), GO_SOURCE.name], cwd=GO_SOURCE.parent, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"go build failed:\n{built.stderr}"

    def render(jobs: list[dict]) -> list[tuple[str, str]]:
        done = subprocess.run([str(binary)], input=json.dumps(jobs), capture_output=True, text=True,
                              timeout=120, check=True)
        return [(r["output"], r.get("error", "")) for r in json.loads(done.stdout)]

    return render


def go_job(template: str, messages: list[dict], system: str | None = None) -> dict:
    return {"template": template, "system": system or "", "messages": messages}


def jinja_prompt(tokenizer, messages: list[dict], template: str | None, adds_bos: bool) -> str:
    """What the model sees from Hugging Face, minus the BOS the runtime adds on its own."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    if adds_bos:
        assert text.startswith(tokenizer.bos_token)
        text = text[len(tokenizer.bos_token):]
    return text


def modelfile_value(text: str, command: str) -> str | None:
    """The value of ``command`` in a Modelfile we wrote: quoted, ending at the first line end
    where the quotes close (Ollama's rule; our values never contain three quotes in a row)."""
    match = re.search(rf'^{command} (?:"""(.*?)"""|"(.*?)")$', text, flags=re.M | re.S)
    return None if match is None else next(g for g in match.groups() if g is not None)


def split_header(template: str) -> tuple[str, str]:
    """(identity comment line, rest) of a template from get_chat_template."""
    header, rest = template.split("\n", 1)
    assert header.startswith("{#- unsloth_like chat template ")
    return header, rest


def strip_header(template: str) -> str:
    """An official-looking template: no identity comment, no generation markers."""
    return without_generation_markers(split_header(template)[1])


# ------------------------------------------------------------------------------ the Go harness


# ollama's template/gemma3-instruct.gotmpl and its testdata/.../system-user-assistant-user output:
# it reads .Messages, $.System, slice and len, so it pins the data contract the harness emulates.
OLLAMA_GEMMA3 = ('{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
                 '{{- if eq .Role "user" }}<start_of_turn>user\n{{- if and (eq $i 1) $.System }}\n'
                 '{{ $.System }}\n{{ end }}\n{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}'
                 '<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n{{- if $last }}<start_of_turn>'
                 'model\n{{ end }}\n{{- end }}\n')
OLLAMA_GEMMA3_EXPECTED = (
    "<start_of_turn>user\nYou are a helpful assistant.\n\nHello, how are you?<end_of_turn>\n<start_of_turn>"
    "model\nI'm doing great. How can I help you today?<end_of_turn>\n<start_of_turn>user\nI'd like to show "
    "off how chat templating works!<end_of_turn>\n<start_of_turn>model\n\n"
)


def test_harness_renders_ollamas_own_template_as_ollamas_tests_expect(ollama_render):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                {"role": "user", "content": "I'd like to show off how chat templating works!"}]
    assert ollama_render([go_job(OLLAMA_GEMMA3, messages)]) == [(OLLAMA_GEMMA3_EXPECTED, "")]


def test_harness_inserts_the_modelfile_system_and_merges_turns_as_ollama_does(ollama_render):
    probe = ("{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}"
             "{{ .Response }}|{{ .Tools }}|{{ .Nope }}")
    user, other = {"role": "user", "content": "a"}, {"role": "user", "content": "b"}
    own_system = {"role": "system", "content": "mine"}
    assert ollama_render([
        go_job(probe, [user, other], system="default"),  # SYSTEM first; consecutive turns merged
        go_job(probe, [own_system, user], system="default"),  # the conversation's own system wins
        go_job("{{ .Prompt }}", [user]),  # legacy templates are refused, not guessed at
    ]) == [
        ("default|system=default;user=a\n\nb;|null|<no value>", ""),
        ("mine|system=mine;user=a;|null|<no value>", ""),
        ("", "the template does not use .Messages; the legacy .Prompt/.Response form is not emulated"),
    ]


# ------------------------------------------------------------------------------ Go == Jinja, every record


@pytest.fixture(scope="module")
def go_and_jinja(load, ollama_render):
    """For every record: {case: (jinja, go)} over the conversations, two tokenizers and two
    default system messages (none, and the record's own or OTHER_DEFAULT), in one Go call."""
    keys, jobs, jinja = [], [], []
    for zoo_name in ZOO_TOKENIZERS:
        tokenizer = load(zoo_name)
        for name, record in CHAT_TEMPLATES.items():
            go_template, _ = record.ollama(tokenizer.eos_token)
            for default in (None, record.default_system_message or OTHER_DEFAULT):
                template = build_jinja(replace(record, default_system_message=default))
                for case, messages in CONVERSATIONS.items():
                    keys.append((name, f"{zoo_name} tokenizer, default system {default!r}, {case}"))
                    jinja.append(jinja_prompt(tokenizer, messages, template, record.adds_bos))
                    jobs.append(go_job(go_template, messages, system=default))
    results: dict[str, dict[str, tuple[str, str]]] = {}
    for (name, case), want, (got, error) in zip(keys, jinja, ollama_render(jobs)):
        assert not error, f"{name}, {case}: {error}"
        results.setdefault(name, {})[case] = (want, got)
    return results


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_go_template_renders_what_the_jinja_renders(go_and_jinja, name):
    for case, (jinja, go) in go_and_jinja[name].items():
        assert go == jinja, case


def test_modelfile_serves_what_the_tokenizer_renders(load, ollama_render):
    """End to end: tokenizer -> get_chat_template -> Modelfile (TEMPLATE, SYSTEM) -> Ollama's render."""
    jobs, expected = [], []
    for name, record in CHAT_TEMPLATES.items():
        tokenizer = get_chat_template(load("mistral"), name)
        text = build_modelfile(tokenizer, "model.gguf")
        for messages in CONVERSATIONS.values():
            jobs.append(go_job(modelfile_value(text, "TEMPLATE"), messages, modelfile_value(text, "SYSTEM")))
            expected.append((jinja_prompt(tokenizer, messages, None, record.adds_bos), ""))
    assert ollama_render(jobs) == expected


# ------------------------------------------------------------------------------ ollama_template_for


def test_a_get_chat_template_tokenizer_gets_its_record(load):
    for name, record in CHAT_TEMPLATES.items():
        found = ollama_template_for(get_chat_template(load("llama"), name))
        assert found == record, name


def test_the_header_keeps_a_custom_system_message(load):
    tokenizer = get_chat_template(load("llama"), "llama-3", system_message="Be kind.")
    assert ollama_template_for(tokenizer) == replace(CHAT_TEMPLATES["llama-3"], default_system_message="Be kind.")


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_a_template_without_header_is_identified_by_its_rendering(load, name):
    tokenizer = get_chat_template(load("mistral"), name)
    tokenizer.chat_template = strip_header(tokenizer.chat_template)
    record, found = CHAT_TEMPLATES[name], ollama_template_for(tokenizer)
    # Records that render alike (chatml / qwen-3, the gemmas) share their Ollama counterpart.
    assert found is not None and found.ollama("</s>") == record.ollama("</s>")
    assert found.default_system_message == record.default_system_message


def test_a_custom_default_system_message_is_read_off_the_rendering(load):
    tokenizer = get_chat_template(load("qwen2"), "chatml", system_message="Talk like a pirate.")
    tokenizer.chat_template = strip_header(tokenizer.chat_template)
    assert ollama_template_for(tokenizer) == replace(CHAT_TEMPLATES["chatml"],
                                                     default_system_message="Talk like a pirate.")


def test_the_zoo_models_official_templates(load):
    assert ollama_template_for(load("llama")).name == "llama-3"  # Meta's Llama 3 template
    assert ollama_template_for(load("qwen2")).name == "chatml"
    # Mistral's own template puts a space before replies and refuses system messages: no record
    # renders like it (ours folds a system message into the first turn instead of raising).
    assert ollama_template_for(load("mistral")) is None


def test_a_template_must_raise_where_the_record_raises(load):
    tokenizer = get_chat_template(load("qwen2"), "chatml")
    refuse_system = ("{%- for m in messages %}{%- if m['role'] == 'system' %}"
                     "{{- raise_exception('no system messages') }}{%- endif %}{%- endfor %}")
    tokenizer.chat_template = refuse_system + strip_header(tokenizer.chat_template)
    assert ollama_template_for(tokenizer) is None


def test_an_edited_template_is_identified_by_its_rendering_not_its_header(load, caplog):
    tokenizer = get_chat_template(load("llama"), "chatml")
    header, _ = split_header(tokenizer.chat_template)
    tokenizer.chat_template = header + "\n" + strip_header(CHAT_TEMPLATES["llama-3"].jinja)
    with caplog.at_level(logging.WARNING, logger="unsloth_like.save.ollama"):
        assert ollama_template_for(tokenizer).name == "llama-3"
    assert "names the 'chatml' format in its header but renders differently" in caplog.text


def test_a_custom_template_tuple_is_identified_by_its_rendering(load):
    chatml = strip_header(CHAT_TEMPLATES["chatml"].jinja)
    tokenizer = get_chat_template(load("qwen2"), (chatml, "<|im_end|>"))
    assert ollama_template_for(tokenizer).name == "chatml"


def test_no_chat_template_gives_none(load):
    tokenizer = load("qwen2")
    tokenizer.chat_template = None
    assert ollama_template_for(tokenizer) is None


# ------------------------------------------------------------------------------ the Modelfile


def test_modelfile_exact_text(load):
    tokenizer = get_chat_template(load("qwen2"), "qwen-2.5")
    assert build_modelfile(tokenizer, "qwen.Q8_0.gguf") == (
        "FROM ./qwen.Q8_0.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
        '"""\n'
        'PARAMETER stop "<|im_start|>"\n'
        'PARAMETER stop "<|im_end|>"\n'
        'SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."\n'
    )


def test_modelfile_fills_the_eos_where_the_template_ends_turns_with_it(load):
    text = build_modelfile(get_chat_template(load("mistral"), "mistral"), "m.gguf")
    assert "{{ .Content }}</s>" in modelfile_value(text, "TEMPLATE")
    assert re.findall(r"^PARAMETER stop (.*)$", text, flags=re.M) == ['"</s>"', '"[INST]"', '"[/INST]"']
    assert "SYSTEM" not in text


def test_modelfile_system_message_and_parameters(load):
    tokenizer = get_chat_template(load("llama"), "llama-3")
    text = build_modelfile(tokenizer, "m.gguf", system_message="First line.\nSecond line.",
                           parameters={"temperature": 0.7, "num_ctx": 4096, "stop": ["<|eot_id|>", "User:"],
                                       "use_mmap": False, "seed": [1]})
    stops = re.findall(r"^PARAMETER stop (.*)$", text, flags=re.M)
    assert stops == ['"<|start_header_id|>"', '"<|end_header_id|>"', '"<|eot_id|>"', '"User:"']
    assert ("PARAMETER temperature 0.7\nPARAMETER num_ctx 4096\nPARAMETER use_mmap false\nPARAMETER seed 1\n"
            'SYSTEM """First line.\nSecond line."""\n') in text
    assert modelfile_value(text, "SYSTEM") == "First line.\nSecond line."


def test_modelfile_without_a_matching_template_warns_and_keeps_the_eos_stop(load, caplog):
    with caplog.at_level(logging.WARNING, logger="unsloth_like.save.ollama"):
        text = build_modelfile(load("mistral"), "m.gguf")
    assert text == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'
    [record] = [r for r in caplog.records if r.name == "unsloth_like.save.ollama"]
    assert "no TEMPLATE" in record.message and "chat template embedded in the GGUF metadata" in record.message
    assert "add a TEMPLATE" in record.message


def test_modelfile_without_any_chat_template_says_to_add_one(load, caplog):
    tokenizer = load("mistral")
    tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING, logger="unsloth_like.save.ollama"):
        assert build_modelfile(tokenizer, "m.gguf", system_message="Hi.") == (
            'FROM ./m.gguf\nPARAMETER stop "</s>"\nSYSTEM "Hi."\n')
    assert "has no chat template" in caplog.text and "add a TEMPLATE" in caplog.text


def test_values_ollama_cannot_read_back_are_refused(load, monkeypatch):
    tokenizer = get_chat_template(load("qwen2"), "chatml")
    with pytest.raises(ValueError, match='The system message contains """, which ends a Modelfile value'):
        build_modelfile(tokenizer, "m.gguf", system_message='Say """hi""".')
    with pytest.raises(ValueError, match=r"contains the characters \['\\x00'\], which Ollama's Modelfile parser"):
        build_modelfile(tokenizer, "m.gguf", system_message="a\x00b")
    broken = replace(CHAT_TEMPLATES["chatml"], ollama_template='{{ range .Messages }}"""{{ end }}')
    monkeypatch.setattr(ollama, "ollama_template_for", lambda tokenizer: broken)
    with pytest.raises(ValueError, match=r"The Ollama template of 'chatml' contains \"\"\""):
        build_modelfile(tokenizer, "m.gguf")


def test_values_that_look_like_quotes_are_written_so_they_read_back(load):
    tokenizer = get_chat_template(load("qwen2"), "chatml")
    for stop in ('"', '""', '"quoted"', 'ends with "', "two  spaces "):
        text = build_modelfile(tokenizer, "m.gguf", parameters={"stop": stop})
        line = text.splitlines()[-1]
        value = line.removeprefix("PARAMETER stop ")
        # Ollama's unquote: '"""' opens a triple-quoted value, else one '"' pair is stripped.
        unquoted = value[3:-3] if value.startswith('"""') else value[1:-1]
        assert unquoted == stop and value.endswith('"'), line


def test_bad_file_names_and_parameters_are_refused(load):
    tokenizer = get_chat_template(load("qwen2"), "chatml")
    for name in ("dir/m.gguf", "", "..", " m.gguf", "m\n.gguf"):
        with pytest.raises(ValueError, match="gguf_filename"):
            build_modelfile(tokenizer, name)
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        build_modelfile(tokenizer, "m.gguf", parameters={"top-k": 3})
    with pytest.raises(TypeError, match="must be a string, number or boolean"):
        build_modelfile(tokenizer, "m.gguf", parameters={"top_k": {"a": 1}})


def test_write_modelfile_is_atomic_and_readable(tmp_path):
    (tmp_path / "Modelfile").write_text("old")
    path = write_modelfile(tmp_path, "FROM ./m.gguf\n")
    assert path == tmp_path / "Modelfile" and path.read_bytes() == b"FROM ./m.gguf\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]  # no staging file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_modelfile_leaves_nothing_when_the_write_fails(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        write_modelfile(tmp_path, "FROM ./m.gguf\n\ud800")  # a lone surrogate cannot be UTF-8
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ {INPUT}/{OUTPUT} prompts


@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATES))
def test_prompt_templates_render_the_same_in_go_and_jinja(name, load, ollama_render):
    """A custom prompt (Unsloth's Ollama notebook): the Modelfile that get_chat_template attaches
    (``tokenizer._ollama_modelfile``) and the one save_pretrained_gguf writes serve in Ollama
    what the tokenizer renders, with its SYSTEM, for every conversation and both tokenizers."""
    jobs, expected = [], []
    for zoo_name in ZOO_TOKENIZERS:
        tokenizer = get_chat_template(load(zoo_name), PROMPT_TEMPLATES[name])
        attached = tokenizer._ollama_modelfile
        written = build_modelfile(tokenizer, "model.gguf")
        assert attached == written.replace("FROM ./model.gguf", "FROM {__FILE_LOCATION__}", 1)
        assert modelfile_value(written, "TEMPLATE") is not None  # identified through its header
        for messages in CONVERSATIONS.values():
            jobs.append(go_job(modelfile_value(written, "TEMPLATE"), messages, modelfile_value(written, "SYSTEM")))
            expected.append((jinja_prompt(tokenizer, messages, None, True), ""))
    assert ollama_render(jobs) == expected
