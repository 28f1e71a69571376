"""The chat template a GGUF carries renders in llama.cpp's own Jinja engine as in transformers.

llama-server, and Ollama by default, render ``tokenizer.chat_template`` with llama.cpp's C++
engine (``common/jinja``), not Python's Jinja2: a construct it lacks, or a filter it implements
differently, would change every prompt the exported model sees. The engine is built from the
installed llama-cpp-python's llama.cpp sources by ``scripts/build_llamacpp_jinja.py`` (``make
test`` does it); without it these tests are skipped.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from unsloth_like.chat_templates import (
    CHAT_TEMPLATES,
    get_chat_template,
    inference_template,
    without_generation_markers,
)

from ..prompt_templates import PROMPT_TEMPLATES  # noqa: E402

RENDERER = Path(__file__).resolve().parents[2] / "build" / "llamacpp-jinja" / "render"
pytestmark = pytest.mark.skipif(not RENDERER.exists(),
                                reason="llama.cpp's Jinja renderer is not built: python scripts/build_llamacpp_jinja.py")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🚀, 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "  Thanks!\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from unsloth_like.testing.tokenizer import TOKENIZERS, save_tokenizer

    path = tmp_path_factory.mktemp("llama3-tokenizer")
    save_tokenizer(TOKENIZERS["llama3"], path, model_max_length=2048)
    return path


@pytest.fixture
def fresh(tokenizer_dir):
    from transformers import AutoTokenizer

    return lambda: AutoTokenizer.from_pretrained(tokenizer_dir)


def llamacpp_render(requests: list[dict]) -> list[dict]:
    done = subprocess.run([str(RENDERER)], input=json.dumps(requests), capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


def _requests(tokenizer, template: str) -> tuple[list[dict], list[str]]:
    """llama.cpp requests for every conversation, with and without the generation prompt, and
    what transformers renders for each."""
    requests, expected = [], []
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            requests.append({"template": template, "context": {
                "messages": conversation, "add_generation_prompt": prompt,
                "bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}})
            expected.append(tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                          add_generation_prompt=prompt))
    return requests, expected


@pytest.mark.parametrize("system_message", [None, "Talk like a pirate."], ids=["default-system", "own-system"])
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_every_template_renders_in_llama_cpp_as_in_transformers(name, system_message, fresh, caplog):
    with caplog.at_level(logging.ERROR):  # get_chat_template warns about tokens it adds
        tokenizer = get_chat_template(fresh(), name, system_message=system_message)
    template = inference_template(tokenizer.chat_template)
    requests, expected = _requests(tokenizer, template)
    for result, want, request in zip(llamacpp_render(requests), expected, requests):
        assert result == {"text": want}, (request["context"]["messages"], request["context"]["add_generation_prompt"])


def test_the_sharegpt_prelude_also_renders_in_llama_cpp(fresh):
    """The GGUF gets the runtime form, but a tokenizer saved with the mapping prelude (HF format)
    still works in llama.cpp: its engine has ``dict(mapping, key=value)`` and ``namespace``."""
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tokenizer = get_chat_template(fresh(), "llama-3.1", mapping=mapping)
    assert "dict(" in tokenizer.chat_template
    requests, expected = _requests(tokenizer, without_generation_markers(tokenizer.chat_template))
    assert [r.get("text") for r in llamacpp_render(requests)] == expected


def test_refusals_raise_in_llama_cpp_too(fresh):
    """Tools and unknown roles stop the render with our message, not a silently different prompt."""
    tokenizer = get_chat_template(fresh(), "chatml")
    template = inference_template(tokenizer.chat_template)
    tool_call = {"messages": CONVERSATIONS[0], "add_generation_prompt": True,
                 "tools": [{"type": "function", "function": {"name": "f"}}]}
    unknown_role = {"messages": [{"role": "ipython", "content": "x"}], "add_generation_prompt": True}
    results = llamacpp_render([{"template": template, "context": tool_call},
                               {"template": template, "context": unknown_role}])
    assert "renders text conversations only" in results[0]["error"]
    assert 'cannot render message 0 with role "ipython"' in results[1]["error"]


@pytest.mark.parametrize("system_message", [None, "Talk like a pirate."], ids=["default-system", "own-system"])
@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATES))
def test_prompt_templates_render_in_llama_cpp_as_in_transformers(name, system_message, fresh):
    """{INPUT}/{OUTPUT} prompts (Unsloth's custom templates) in llama.cpp's engine, as embedded in a GGUF."""
    tokenizer = get_chat_template(fresh(), PROMPT_TEMPLATES[name], system_message=system_message)
    template = inference_template(tokenizer.chat_template)
    requests, expected = _requests(tokenizer, template)
    for result, want, request in zip(llamacpp_render(requests), expected, requests):
        assert result == {"text": want}, (request["context"]["messages"], request["context"]["add_generation_prompt"])
