"""``unsloth-like chat``: multi-turn conversations typed on stdin, with a model directory, an adapter
directory (its base loaded with it) and a GGUF file through llama.cpp; the answers are the model's
greedy ones, the history grows turn by turn and ``/reset`` clears it; bad sources are refused."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

from unsloth_like import FastLanguageModel
from unsloth_like.chat import ChatSettings, run_chat
from unsloth_like.cli import main as cli_main
from unsloth_like.kernels import use_backend
from unsloth_like.testing.zoo import zoo_model_dir


def _talk(source, lines: str, **settings):
    out = io.StringIO()
    chat = ChatSettings(source=source, max_new_tokens=6, **settings)
    with use_backend("torch"):
        answered = run_chat(chat, stdin=io.StringIO(lines), stdout=out)
    return answered, chat.history, out.getvalue()


def _greedy(source, messages, max_new_tokens=6):
    model, tokenizer = FastLanguageModel.from_pretrained(str(source), load_in_4bit=False)
    FastLanguageModel.for_inference(model)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad(), use_backend("torch"):
        output = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_a_model_directory_answers_turn_after_turn(zoo_cache):
    source = zoo_model_dir("qwen2", zoo_cache)
    answered, history, shown = _talk(source, "What is 3 plus 4?\n\nAnd 5 plus 6?\n/exit\nnot read\n")
    assert answered == 2
    assert [turn["role"] for turn in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == _greedy(source, history[:1])  # the model's own greedy answer
    assert history[3]["content"] == _greedy(source, history[:3])  # with the first turn in context
    assert shown.count(">>> ") == 4 and history[1]["content"] in shown


def test_reset_starts_a_new_conversation_and_an_adapter_directory_loads_its_base(zoo_cache, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    answered, history, shown = _talk(tmp_path / "adapter", "Hello\n/reset\nDescribe a red kite.\n",
                                     system="Answer briefly.")
    assert answered == 2 and "(new conversation)" in shown
    assert [turn["content"] for turn in history if turn["role"] == "user"] == ["Describe a red kite."]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_gguf_file_answers_through_llama_cpp(zoo_cache, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    [path] = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="q8_0")
    answered, history, shown = _talk(path, "What is 3 plus 4?\nAnd 5 plus 6?\n")
    assert answered == 2 and len(history) == 4
    assert all(isinstance(turn["content"], str) for turn in history)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing", "does not exist; pass a GGUF file"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "is a file but not a .gguf"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "neither config.json nor adapter_config.json"),
])
def test_bad_sources_are_refused_with_exit_status_2(make, message, tmp_path, capsys):
    assert cli_main(["chat", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err
