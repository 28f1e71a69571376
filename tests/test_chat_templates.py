"""Chat templates: faithful rendering, assistant masks, EOS mapping, Ollama counterparts, datasets.

Expected strings are written out by hand per family; where TRL ships a copy of a model's official
template (``trl/chat_templates/*.jinja``), the rendering is also compared with it, and the short
official templates (ChatML, Mistral v0.1, Zephyr) are fixtures here.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import subprocess
import sys

import pytest

from unsloth_like.chat_templates import (
    CHAT_TEMPLATES,
    EOS_PLACEHOLDER,
    apply_chat_template,
    chat_template_spec,
    get_chat_template,
    standardize_sharegpt,
    to_sharegpt,
    without_generation_markers,
)

SYSTEM = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi!"}
A1 = {"role": "assistant", "content": "Hello."}
U2 = {"role": "user", "content": "2+2?"}
A2 = {"role": "assistant", "content": "4"}
FULL = [SYSTEM, U1, A1, U2, A2]
PROMPT = [U1, A1, U2]

# Per template: (FULL rendered, PROMPT rendered with add_generation_prompt), with the "spm" zoo
# tokenizer (BOS <s>, EOS </s>).
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
        "2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama-3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n4<|eot_id|>",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-3.1": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen-2.5": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
        "2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen-3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
        "2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen-3-thinking": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "4<|im_end|>\n",
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
        "2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    ),
    "mistral": (
        "<s>[INST] Be brief.\n\nHi! [/INST]Hello.</s>[INST] 2+2? [/INST]4</s>",
        "<s>[INST] Hi! [/INST]Hello.</s>[INST] 2+2? [/INST]",
    ),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<s><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "phi-3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\n2+2?<|end|>\n"
        "<|assistant|>\n4<|end|>\n</s>",
        "<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
    ),
    "phi-4": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi!<|im_end|><|im_start|>"
        "assistant<|im_sep|>Hello.<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant"
        "<|im_sep|>4<|im_end|>",
        "<|im_start|>user<|im_sep|>Hi!<|im_end|><|im_start|>assistant<|im_sep|>Hello.<|im_end|><|im_start|>"
        "user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>",
    ),
    "alpaca": (
        "<s>Be brief.\n\n### Instruction:\nHi!\n\n### Response:\nHello.</s>\n\n### Instruction:\n2+2?\n\n"
        "### Response:\n4</s>\n\n",
        "<s>Below are some instructions that describe some tasks. Write responses that appropriately complete "
        "each request.\n\n### Instruction:\nHi!\n\n### Response:\nHello.</s>\n\n### Instruction:\n2+2?\n\n"
        "### Response:\n",
    ),
    "vicuna": (
        "<s>Be brief. USER: Hi! ASSISTANT: Hello.</s>USER: 2+2? ASSISTANT: 4</s>",
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi! ASSISTANT: Hello.</s>"
        "USER: 2+2? ASSISTANT:",
    ),
    "zephyr": (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n<|user|>\n2+2?</s>\n"
        "<|assistant|>\n4</s>\n",
        "<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n",
    ),
    "unsloth": (
        "<s>Be brief.\n>>> User: Hi!\n>>> Assistant: Hello.</s>\n>>> User: 2+2?\n>>> Assistant: 4</s>\n",
        "<s>You are a helpful assistant to the user\n>>> User: Hi!\n>>> Assistant: Hello.</s>\n>>> User: "
        "2+2?\n>>> Assistant: ",
    ),
}
EXPECTED["gemma2"] = EXPECTED["gemma-3"] = EXPECTED["gemma"]  # one family rendering

# Short official templates (as shipped in the models' tokenizer_config.json).
OFFICIAL_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OFFICIAL_MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
OFFICIAL_ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Templates TRL ships a verbatim copy of (trl/chat_templates/<file>.jinja).
TRL_OFFICIAL = {"llama-3": "llama3", "llama-3.1": "llama3_1", "qwen-2.5": "qwen2_5",
                "qwen-3": "qwen3_instruct_2507", "gemma": "gemma", "gemma-3": "gemma3", "phi-3": "phi3_5"}
# Official templates that refuse a system message (ours fold it into the first user turn).
NO_SYSTEM_OFFICIAL = {"gemma", "mistral"}

ZOO_STYLES = ("llama3", "qwen2", "spm")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """The three zoo tokenizers (tokenizer only: no model weights to build)."""
    from unsloth_like.testing.tokenizer import TOKENIZERS, save_tokenizer

    root = tmp_path_factory.mktemp("chat-template-tokenizers")
    for style in ZOO_STYLES:
        save_tokenizer(TOKENIZERS[style], root / style, model_max_length=2048)
    return root


@pytest.fixture
def load(tokenizer_dirs):
    """A fresh tokenizer per call (get_chat_template changes the one it is given)."""
    from transformers import AutoTokenizer

    return lambda style: AutoTokenizer.from_pretrained(tokenizer_dirs / style)


def render(tokenizer, messages, template, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


# ------------------------------------------------------------------------------ registry


def test_every_notebook_name_resolves_to_a_record():
    names = ["chatml", "llama-3", "llama3", "llama-3.1", "llama-31", "llama-3.2", "llama-3.3", "qwen-2.5",
             "qwen25", "qwen2.5", "qwen-3", "qwen-3-thinking", "mistral", "gemma", "gemma2", "gemma-2",
             "gemma-3", "gemma3", "phi-3", "phi-35", "phi-3.5", "phi-4", "alpaca", "vicuna", "zephyr", "unsloth"]
    for name in names:
        assert chat_template_spec(name) is CHAT_TEMPLATES[chat_template_spec(name).name]
    assert chat_template_spec("LLAMA-3").name == "llama-3"
    assert set(EXPECTED) == set(CHAT_TEMPLATES)


def test_unknown_template_name_lists_known_ones_and_the_closest():
    with pytest.raises(ValueError, match=r"Unknown chat template 'lama-3'\. Did you mean 'llama-3'\?") as info:
        chat_template_spec("lama-3")
    assert "chatml" in str(info.value) and "qwen-3-thinking" in str(info.value)


def test_unknown_template_name_in_get_chat_template_leaves_the_tokenizer_alone(load):
    tokenizer = load("llama3")
    before = (tokenizer.chat_template, tokenizer.eos_token)
    with pytest.raises(ValueError, match="Did you mean 'gemma-3'"):
        get_chat_template(tokenizer, "gemma-33")
    assert (tokenizer.chat_template, tokenizer.eos_token) == before


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_renders_the_family_format(load, name):
    tokenizer = load("spm")
    template = CHAT_TEMPLATES[name].jinja
    full, prompt = EXPECTED[name]
    assert render(tokenizer, FULL, template) == full
    assert render(tokenizer, PROMPT, template, add_generation_prompt=True) == prompt


def _official_templates():
    official = {"chatml": OFFICIAL_CHATML, "mistral": OFFICIAL_MISTRAL_V01, "zephyr": OFFICIAL_ZEPHYR}
    folder = importlib.resources.files("trl") / "chat_templates"
    for name, file in TRL_OFFICIAL.items():
        path = folder / f"{file}.jinja"
        if path.is_file():
            official[name] = path.read_text()
    return official


@pytest.mark.parametrize("name", sorted(_official_templates()))
def test_matches_the_official_template(load, name):
    official = _official_templates()[name]
    tokenizer = load("llama3")
    conversations = [PROMPT, [U1, A1, U2, {"role": "assistant", "content": "  four \n"}]]
    if name not in NO_SYSTEM_OFFICIAL:
        conversations += [FULL, [SYSTEM, U1]]
    for messages in conversations:
        for prompt in (False, True):
            want = render(tokenizer, messages, official, add_generation_prompt=prompt)
            got = render(tokenizer, messages, CHAT_TEMPLATES[name].jinja, add_generation_prompt=prompt)
            assert got == want, (messages, prompt)


def test_llama31_takes_the_date_as_the_official_template_does(load):
    text = render(load("llama3"), PROMPT, CHAT_TEMPLATES["llama-3.1"].jinja, date_string="01 Jan 2026")
    assert "Today Date: 01 Jan 2026\n\n<|eot_id|>" in text


def test_qwen3_thinking_keeps_the_reasoning_of_the_last_turn_only(load):
    messages = [U1, {"role": "assistant", "content": "<think>\nold\n</think>\n\nHello."}, U2,
                {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4"}]
    text = render(load("qwen2"), messages, CHAT_TEMPLATES["qwen-3-thinking"].jinja)
    assert "old" not in text
    assert text.endswith("<|im_start|>assistant\n<think>\n2 and 2 make 4\n</think>\n\n4<|im_end|>\n")


def test_without_generation_markers_renders_the_same_text(load):
    tokenizer = load("llama3")
    for spec in CHAT_TEMPLATES.values():
        plain = without_generation_markers(spec.jinja)
        assert "{%- generation %}" in spec.jinja and re.search(r"\{%-?\s*(end)?generation", plain) is None
        assert render(tokenizer, FULL, plain) == render(tokenizer, FULL, spec.jinja)


# ------------------------------------------------------------------------------ bad conversations


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_unknown_roles_raise(load, name):
    from jinja2.exceptions import TemplateError

    tokenizer = load("qwen2")
    with pytest.raises(TemplateError, match=f"The {re.escape(name)} chat template cannot render message 1 "
                                            "with role \"tool\""):
        render(tokenizer, [U1, {"role": "tool", "content": "42"}], CHAT_TEMPLATES[name].jinja)


@pytest.mark.parametrize("name", ["gemma", "gemma-3", "mistral", "alpaca", "vicuna", "unsloth"])
def test_templates_taking_one_leading_system_message_refuse_a_later_one(load, name):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=r"system only as the first one"):
        render(load("spm"), [U1, A1, SYSTEM, U2], CHAT_TEMPLATES[name].jinja)


@pytest.mark.parametrize("name", ["gemma-3", "mistral"])
def test_turns_must_alternate_where_the_family_requires_it(load, name):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="needs? user and assistant turns to alternate"):
        render(load("spm"), [U1, U2], CHAT_TEMPLATES[name].jinja)


def test_tools_and_non_text_content_raise_clear_errors(load):
    from jinja2.exceptions import TemplateError

    tokenizer, template = load("qwen2"), CHAT_TEMPLATES["qwen-2.5"].jinja
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    with pytest.raises(TemplateError, match="renders text conversations only"):
        render(tokenizer, PROMPT, template, tools=tools)
    with pytest.raises(TemplateError, match="takes text content only, but message 0"):
        render(tokenizer, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], template)


# ------------------------------------------------------------------------------ assistant masks


def _reply_spans(text: str, replies: list[str]) -> set[int]:
    chars, start = set(), 0
    for reply in replies:
        start = text.index(reply, start)
        chars.update(range(start, start + len(reply)))
        start += len(reply)
    return chars


@pytest.mark.parametrize("style", ZOO_STYLES)
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_assistant_mask_covers_exactly_the_replies_and_their_turn_end(load, name, style):
    tokenizer = get_chat_template(load(style), name)
    stop = tokenizer.eos_token  # the turn end, once mapped (or the tokenizer's EOS it already was)
    replies = ["Hello." + stop, ("<think>\n\n</think>\n\n4" if name == "qwen-3-thinking" else "4") + stop]
    text = tokenizer.apply_chat_template(FULL, tokenize=False)
    encoded = tokenizer.apply_chat_template(FULL, return_dict=True, return_assistant_tokens_mask=True)
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == plain["input_ids"]
    masked = {c for (start, end), m in zip(plain["offset_mapping"], encoded["assistant_masks"]) if m
              for c in range(start, end)}
    assert masked == _reply_spans(text, replies)


def test_generation_prompt_is_outside_the_mask(load):
    tokenizer = get_chat_template(load("llama3"), "llama-3")
    encoded = tokenizer.apply_chat_template(PROMPT, return_dict=True, return_assistant_tokens_mask=True,
                                            add_generation_prompt=True)
    ids = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(ids) == "Hello.<|eot_id|>"


# ------------------------------------------------------------------------------ EOS mapping and saving


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_map_eos_token_sets_the_turn_end_and_survives_save_and_load(load, tmp_path, name):
    from transformers import AutoTokenizer

    tokenizer = load("llama3")
    spec = CHAT_TEMPLATES[name]
    get_chat_template(tokenizer, name)
    assert tokenizer.eos_token == (spec.stop_token or "<|end_of_text|>")
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.eos_token, reloaded.eos_token_id) == (tokenizer.eos_token, tokenizer.eos_token_id)
    assert (reloaded.pad_token, reloaded.bos_token) == (tokenizer.pad_token, tokenizer.bos_token)
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert chat_template_spec(reloaded) == spec
    assert render(reloaded, FULL, None) == render(tokenizer, FULL, None)


def test_existing_turn_end_token_keeps_its_id_and_the_pad(load, caplog):
    tokenizer = load("llama3")
    eot_id, size = tokenizer.convert_tokens_to_ids("<|eot_id|>"), len(tokenizer)
    with caplog.at_level(logging.WARNING):
        get_chat_template(tokenizer, "llama-3")
    assert (tokenizer.eos_token_id, len(tokenizer), tokenizer.pad_token) == (eot_id, size, "<|finetune_right_pad_id|>")
    assert "resize_token_embeddings" not in caplog.text


def test_missing_turn_end_token_is_added_as_special_with_a_resize_warning(load, caplog):
    tokenizer = load("spm")  # SentencePiece-style, no pad token, no <|im_end|>
    size = len(tokenizer)
    with caplog.at_level(logging.WARNING, logger="unsloth_like.chat_templates"):
        get_chat_template(tokenizer, "chatml")
    assert len(tokenizer) == size + 1 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.tokenize("a<|im_end|>b")[1] == "<|im_end|>"  # one special token, never split
    assert tokenizer.pad_token == "<unk>"
    assert "'<|im_end|>'" in caplog.text and "model.resize_token_embeddings(len(tokenizer))" in caplog.text


def test_a_pad_equal_to_the_new_eos_is_replaced(load):
    tokenizer = load("llama3")
    tokenizer.pad_token = "<|eot_id|>"
    get_chat_template(tokenizer, "llama-3")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token == "<|finetune_right_pad_id|>"


def test_map_eos_token_false_leaves_the_eos(load):
    tokenizer = get_chat_template(load("llama3"), "chatml", map_eos_token=False)
    assert tokenizer.eos_token == "<|end_of_text|>" and "<|im_end|>" not in tokenizer.get_vocab()
    with pytest.raises(TypeError, match="map_eos_token must be True or False"):
        get_chat_template(load("llama3"), "chatml", map_eos_token="yes")


# ------------------------------------------------------------------------------ system message and mapping


def test_system_message_replaces_the_default_and_is_remembered(load, tmp_path):
    from transformers import AutoTokenizer

    odd = 'Say "hi" %} {{ x }} #} \\n – done.\nSecond line.'
    tokenizer = get_chat_template(load("qwen2"), "qwen-2.5", system_message=odd)
    assert render(tokenizer, [U1], None).startswith(f"<|im_start|>system\n{odd}<|im_end|>\n<|im_start|>user\n")
    assert render(tokenizer, [SYSTEM, U1], None).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    tokenizer.save_pretrained(tmp_path)
    assert chat_template_spec(AutoTokenizer.from_pretrained(tmp_path)).default_system_message == odd


def test_system_message_gives_a_default_to_templates_without_one(load):
    tokenizer = get_chat_template(load("llama3"), "gemma-3", system_message="Be kind.")
    assert render(tokenizer, [U1], None) == "<|begin_of_text|><start_of_turn>user\nBe kind.\n\nHi!<end_of_turn>\n"


def test_sharegpt_mapping_renders_like_role_content(load):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tokenizer = get_chat_template(load("llama3"), "llama-3", mapping=mapping)
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in FULL]
    assert render(tokenizer, sharegpt, None) == render(tokenizer, FULL, None)
    masked = tokenizer.apply_chat_template(sharegpt, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(masked["assistant_masks"]) > 0
    with pytest.raises(ValueError, match="mapping has unknown keys"):
        get_chat_template(load("llama3"), "llama-3", mapping={"speaker": "from"})


@pytest.mark.parametrize("name", ["llama-3.1", "chatml", "mistral", "qwen-3", "custom"])
def test_inference_template_drops_the_sharegpt_prelude_and_renders_the_same(load, name):
    """The GGUF gets the template without the mapping prelude (its dict(...) is Python Jinja only)."""
    from unsloth_like.chat_templates import inference_template, without_generation_markers

    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    custom = ("{% for m in messages %}{{ m['role'] }}: {% generation %}{{ m['content'] }}{% endgeneration %}"
              "{{ '\\n' }}{% endfor %}", "<|eot_id|>")
    template = custom if name == "custom" else name
    mapped = get_chat_template(load("llama3"), template, mapping=mapping, system_message="Be brief.")
    plain = get_chat_template(load("llama3"), template, system_message="Be brief.")
    assert "dict(" in mapped.chat_template
    runtime = inference_template(mapped.chat_template)
    assert "dict(" not in runtime and not re.search(r"\{%-?\s*(end)?generation", runtime)
    assert '"mapping"' not in runtime.splitlines()[0]  # the identity comment no longer claims one
    assert runtime == without_generation_markers(plain.chat_template)  # as if no mapping had been given
    for prompt in (True, False):
        assert render(mapped, FULL, runtime, add_generation_prompt=prompt) == \
            render(mapped, FULL, None, add_generation_prompt=prompt)
    mapped.chat_template = runtime
    assert chat_template_spec(mapped).default_system_message == "Be brief."
    assert inference_template(plain.chat_template) == without_generation_markers(plain.chat_template)


def test_custom_template_tuple(load, caplog):
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                "{{ '\\n' }}{% endfor %}")
    tokenizer = get_chat_template(load("llama3"), (template, "<|eot_id|>"))
    assert tokenizer.eos_token == "<|eot_id|>"
    assert render(tokenizer, [U1, A1], None) == "user: Hi!\nassistant: Hello.<|eot_id|>\n"
    spec = chat_template_spec(tokenizer)
    assert (spec.name, spec.stop_token, spec.ollama_template) == ("custom", "<|eot_id|>", "")
    with caplog.at_level(logging.WARNING):
        get_chat_template(load("llama3"), ("{{ messages }}", "eos_token"))
    assert "no {% generation %} markers" in caplog.text
    with pytest.raises(ValueError, match=r"\(jinja_template, eos_token\) pair"):
        get_chat_template(load("llama3"), ("{{ messages }}",))


def test_spec_of_a_tokenizer_without_our_template_says_what_to_do(load):
    with pytest.raises(ValueError, match="was not set by get_chat_template"):
        chat_template_spec(load("llama3"))


# ------------------------------------------------------------------------------ Ollama counterparts

_MARKER_RE = re.compile(r"<\|?/?[A-Za-z_]+\|?>|\[/?INST\]|### \w+:|>>> \w+:|USER:|ASSISTANT:")


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_ollama_counterpart_uses_the_same_markers_and_stops_on_the_turn_end(name):
    spec = CHAT_TEMPLATES[name]
    go, stops = spec.ollama(eos_token="</s>")
    assert "{{ range" in go or "{{- range" in go
    assert ".Messages" in go and ".Content" in go and EOS_PLACEHOLDER not in go
    markers = set(_MARKER_RE.findall(go)) - {"</s>"}
    assert markers and all(m in spec.body for m in markers), markers - {m for m in markers if m in spec.body}
    assert (spec.stop_token or "</s>") in stops and (spec.stop_token or "</s>") in go
    assert go.count("{{") == go.count("}}")


def test_ollama_template_needs_the_eos_where_it_uses_the_tokenizers():
    assert CHAT_TEMPLATES["llama-3"].ollama() == (CHAT_TEMPLATES["llama-3"].ollama_template,
                                                  CHAT_TEMPLATES["llama-3"].ollama_stop)
    with pytest.raises(ValueError, match=r"ollama\(eos_token=tokenizer.eos_token\)"):
        CHAT_TEMPLATES["mistral"].ollama()


# ------------------------------------------------------------------------------ datasets


def test_standardize_sharegpt_maps_roles_and_keeps_the_column():
    from datasets import Dataset

    dataset = Dataset.from_dict({"conversations": [
        [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        [{"from": "Customer", "value": "q2"}, {"from": "bot", "value": "a2"}],
    ], "id": [1, 2]})
    out = standardize_sharegpt(dataset, aliases={"user": ["customer"]})
    assert out.column_names == ["conversations", "id"]
    assert out[0]["conversations"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a"}]
    assert out[1]["conversations"][0] == {"role": "user", "content": "q2"}


def test_standardize_sharegpt_errors_name_the_row_role_and_columns():
    from datasets import Dataset

    dataset = Dataset.from_dict({"conversations": [[{"from": "human", "value": "q"}],
                                                   [{"from": "narrator", "value": "x"}]]})
    with pytest.raises(ValueError, match=r"Row 1 of column 'conversations' has the unknown role 'narrator'"):
        standardize_sharegpt(dataset)
    with pytest.raises(ValueError, match=r"no 'conversations' or 'messages' column; its columns are \['text'\]"):
        standardize_sharegpt(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="'gpt' is an alias of both"):
        standardize_sharegpt(dataset, aliases={"user": ["gpt"]})


def test_to_sharegpt_merges_columns_and_drops_empty_optional_blocks():
    from datasets import Dataset

    dataset = Dataset.from_dict({"instruction": ["Add", "Greet"], "input": ["2 and 2", ""], "output": ["4", "Hi"]})
    out = to_sharegpt(dataset, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert out.column_names == ["conversations"]
    assert out[0]["conversations"] == [{"from": "human", "value": "Add\nInput: 2 and 2"},
                                       {"from": "gpt", "value": "4"}]
    assert out[1]["conversations"][0] == {"from": "human", "value": "Greet"}
    standardized = standardize_sharegpt(out)
    assert standardized[1]["conversations"][1] == {"role": "assistant", "content": "Hi"}


def test_to_sharegpt_extends_conversations_reproducibly():
    from datasets import Dataset

    dataset = Dataset.from_dict({"q": [f"q{i}" for i in range(6)], "a": [f"a{i}" for i in range(6)]})
    first = to_sharegpt(dataset, merged_prompt="{q}", output_column_name="a", conversation_extension=3)
    again = to_sharegpt(dataset, merged_prompt="{q}", output_column_name="a", conversation_extension=3)
    assert first["conversations"] == again["conversations"]
    row = first[2]["conversations"]
    assert len(row) == 6 and row[0] == {"from": "human", "value": "q2"} and row[1]["value"] == "a2"


def test_to_sharegpt_errors_list_the_columns():
    from datasets import Dataset

    dataset = Dataset.from_dict({"instruction": ["x"], "output": ["y"]})
    with pytest.raises(ValueError, match=r"names the column\(s\) \['input'\].*columns are \['instruction', 'output'\]"):
        to_sharegpt(dataset, merged_prompt="{instruction} {input}")
    with pytest.raises(ValueError, match=r"no output column 'answer'; its columns are \['instruction', 'output'\]"):
        to_sharegpt(dataset, merged_prompt="{instruction}", output_column_name="answer")


def test_apply_chat_template_renders_text_without_a_second_bos(load):
    from datasets import Dataset

    tokenizer = load("llama3")  # its encoder adds <|begin_of_text|> itself
    dataset = Dataset.from_dict({"conversations": [[U1, A1], [SYSTEM, U2, A2]]})
    out = apply_chat_template(dataset, tokenizer, chat_template="llama-3", default_system_message="Be kind.")
    assert out[0]["text"] == ("<|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|><|start_header_id|>"
                              "user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                              "\n\nHello.<|eot_id|>")
    assert "Be brief." in out[1]["text"] and "Be kind." not in out[1]["text"]
    assert tokenizer(out[0]["text"])["input_ids"] == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, U1, A1], return_dict=True)["input_ids"]
    qwen = apply_chat_template(dataset, load("qwen2"), chat_template="chatml")
    assert qwen[0]["text"].startswith("<|im_start|>user\nHi!")


def test_apply_chat_template_names_the_row_that_fails(load):
    from datasets import Dataset

    dataset = Dataset.from_dict({"messages": [[U1, A1], [U1, {"role": "tool", "content": "x"}]]})
    with pytest.raises(ValueError, match=r"Row 1 of column 'messages' could not be rendered: The gemma-3 chat"):
        apply_chat_template(dataset, load("spm"), chat_template="gemma-3")


def test_importing_chat_templates_stays_light():
    code = ("import sys, unsloth_like.chat_templates\n"
            "print(sorted(m for m in ('transformers', 'trl', 'datasets', 'jinja2') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_trl_assistant_only_loss_trains_on_the_replies_only(zoo_cache):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from unsloth_like.testing.zoo import load_zoo_model

    model, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    tokenizer = get_chat_template(tokenizer, "qwen-2.5")
    sharegpt = [[{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello there."},
                 {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]] * 2
    dataset = standardize_sharegpt(Dataset.from_dict({"conversations": sharegpt}))
    args = SFTConfig(output_dir=str(zoo_cache / "sft-unused"), assistant_only_loss=True, report_to=[],
                     use_cpu=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args,
                         train_dataset=dataset.rename_column("conversations", "messages"))
    row = trainer.train_dataset[0]
    trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "Hello there.<|im_end|>4<|im_end|>"


# --- {INPUT}/{OUTPUT} prompt templates ---------------------------------------------------------------

from unsloth_like.chat_templates import prompt_template_spec  # noqa: E402

from .prompt_templates import PROMPT_TEMPLATES  # noqa: E402

TWO_TURNS = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And 4?"}, {"role": "assistant", "content": "9"}]


def _prompt_tokenizer(zoo_cache, prompt, **kwargs):
    from transformers import AutoTokenizer

    from unsloth_like.testing.zoo import zoo_model_dir

    return get_chat_template(AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache)), prompt, **kwargs)


def test_the_ollama_notebooks_prompt_renders_like_the_alpaca_record(zoo_cache):
    """Unsloth's Alpaca-style prompt is the alpaca format: the same text for every conversation."""
    tokenizer = _prompt_tokenizer(zoo_cache, PROMPT_TEMPLATES["alpaca"])
    alpaca = CHAT_TEMPLATES["alpaca"].jinja
    for messages in (TWO_TURNS, TWO_TURNS[:1], [{"role": "system", "content": "Be terse."}, *TWO_TURNS]):
        for prompt in (False, True):
            if prompt and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                              chat_template=alpaca)


@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATES))
def test_a_prompt_repeats_its_exchange_per_turn_with_eos_after_each_reply(name, zoo_cache):
    prompt = PROMPT_TEMPLATES[name]
    tokenizer = _prompt_tokenizer(zoo_cache, prompt)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    system = [{"role": "system", "content": "SYS"}] if "{SYSTEM}" in prompt else []
    text = tokenizer.apply_chat_template([*system, *TWO_TURNS], tokenize=False)
    one = prompt.replace("<|begin_of_text|>", "").replace("{SYSTEM}", "SYS")
    first = one.replace("{INPUT}", "Add 2 and 3.").replace("{OUTPUT}", "5")
    assert text.startswith(bos) and text.count(bos) == 1
    assert text.count(eos) == 2 and text.count("Add 2 and 3.") == 1 and text.count("And 4?") == 1
    # the first exchange is the prompt filled in, with EOS after the reply
    reply_end = first.index("5") + 1
    assert text[len(bos):].startswith(first[:reply_end] + eos + first[reply_end:])
    # the second turn repeats the user prefix and the middle of the prompt
    user_prefix = one[:one.index("{INPUT}")].split("SYS")[-1].lstrip("\n").split("\n\n")[-1]
    middle = one[one.index("{INPUT}") + 7:one.index("{OUTPUT}")]
    assert user_prefix + "And 4?" + middle + "9" + eos in text
    generation = tokenizer.apply_chat_template([*system, *TWO_TURNS[:3]], tokenize=False, add_generation_prompt=True)
    assert generation.endswith("And 4?" + middle)


def test_prompt_templates_set_ollama_modelfile_and_survive_save_and_reload(zoo_cache, tmp_path):
    from transformers import AutoTokenizer

    from unsloth_like.chat_templates import chat_template_spec

    tokenizer = _prompt_tokenizer(zoo_cache, PROMPT_TEMPLATES["alpaca"])
    modelfile = tokenizer._ollama_modelfile
    assert modelfile.startswith("FROM {__FILE_LOCATION__}\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "### Instruction:"' in modelfile and "SYSTEM \"Below are some instructions" in modelfile
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    spec = chat_template_spec(reloaded)
    assert spec.name == "prompt" and spec.prompt == PROMPT_TEMPLATES["alpaca"]
    assert spec == chat_template_spec(tokenizer)


@pytest.mark.parametrize("prompt, message", [
    ("### Instruction:\n{}\n\n### Response:\n{}", "it takes {INPUT}"),
    ("{instruction}\n{INPUT}\n{OUTPUT}", r"The prompt template has \{instruction\}"),
    ("{INPUT} then {INPUT} then {OUTPUT}", "INPUT x2"),
    ("{OUTPUT} before {INPUT}", "must put"),
    ("{INPUT} {SYSTEM} {OUTPUT}", "must put"),
    ("just {INPUT}", "OUTPUT x0"),
], ids=["positional", "column-name", "twice", "order", "system-late", "no-output"])
def test_bad_placeholders_are_one_clear_error(prompt, message, zoo_cache):
    with pytest.raises(ValueError, match=message):
        _prompt_tokenizer(zoo_cache, prompt)


def test_apply_chat_template_with_a_prompt_as_the_ollama_notebook_calls_it(zoo_cache):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from unsloth_like.chat_templates import apply_chat_template, standardize_sharegpt, to_sharegpt
    from unsloth_like.testing.zoo import zoo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache))
    rows = Dataset.from_dict({"instruction": ["Add 2 and 3.", "Name a colour.", "Say hi.", "Count to 3."],
                              "input": ["", "", "politely", ""], "output": ["5", "Red.", "Hello!", "1, 2, 3"]})
    dataset = to_sharegpt(rows, merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
                          output_column_name="output", conversation_extension=3)
    dataset = standardize_sharegpt(dataset)
    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=PROMPT_TEMPLATES["alpaca"],
                                  default_system_message="You are a calculator.")
    text = dataset[0]["text"]
    assert text.startswith("You are a calculator.\n\n### Instruction:\n")  # the text leaves BOS to the tokenizer
    assert text.count("### Instruction:\n") == len(dataset[0]["conversations"]) // 2
    assert text.count(tokenizer.eos_token) == len(dataset[0]["conversations"]) // 2
    assert tokenizer._ollama_modelfile.startswith("FROM {__FILE_LOCATION__}")


def test_a_prompt_ollama_cannot_hold_still_trains_and_says_so(zoo_cache, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="unsloth_like"):
        tokenizer = _prompt_tokenizer(zoo_cache, 'Q: """{INPUT}"""\nA: {OUTPUT}')
    assert tokenizer._ollama_modelfile is None
    assert any("No Ollama Modelfile" in r.getMessage() for r in caplog.records)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith('Q: """hi"""\nA: ')
