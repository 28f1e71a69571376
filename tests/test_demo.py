"""The built-in demo job (the README's first command) end to end.

The demo's patched model would run our kernels through the Triton interpreter here (~25 s per
step); the demo is about the pipeline, so it runs on the kernels' torch references, as it does
for a user on a CPU machine (no TRITON_INTERPRET).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from unsloth_like.demo import DemoSettings, run_demo
from unsloth_like.demo_data import demo_chats, held_back_questions
from unsloth_like.testing.corpus import demo_conversations
from unsloth_like.kernels import use_backend
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_demo_trains_and_saves_a_loadable_adapter(architecture, zoo_cache, tmp_path):
    """A random zoo model (``architecture``): the whole pipeline; it learns the answers' form only."""
    out = tmp_path / "demo"
    messages = []
    with use_backend("torch"):
        result = run_demo(
            DemoSettings(output_dir=out, architecture=architecture, max_steps=10, batch_size=4,
                         n_conversations=64, cache_dir=zoo_cache),
            log=messages.append,
        )
    assert len(result.losses) == 10
    assert result.last_loss < result.first_loss - 0.2, result.losses
    assert f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}" in messages[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "demo_summary.json",
                 "merged/config.json", "gguf/Modelfile"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging removed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["losses"] == result.losses
    assert summary["gguf"] == [f"{architecture}-demo.Q8_0.gguf", f"{architecture}-demo.Q4_K_M.gguf"]
    # greedy answers to held-back prompts: before and after training, from the merged export
    # reloaded by plain transformers, and from the q8_0 GGUF through llama.cpp when it is installed
    stages = ["before", "after", "merged"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    assert list(summary["answers"]) == stages and summary["answers"] == result.answers
    assert result.prompts == [q for q, _ in held_back_questions()] == summary["prompts"]
    assert result.expected == [a for _, a in held_back_questions()] == summary["expected"]
    assert all(len(texts) == 24 for texts in result.answers.values())
    assert summary["exact"] == {stage: result.exact(stage) for stage in stages}
    assert not set(result.prompts) & {chat[0]["content"] for chat in demo_chats(64, seed=3407)}
    assert messages[1].startswith("demo: greedy answers to questions training never saw")
    assert messages[1].count("  Q: ") == 3 and "exact answers to all 24 held-back questions: before" in messages[1]
    assert f"demo: trained zoo '{architecture}' (random weights)" in messages[0]
    for gguf_file in summary["gguf"]:
        assert (out / "gguf" / gguf_file).is_file()

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it was trained
    base, tokenizer = load_zoo_model(architecture, cache_dir=zoo_cache)
    reloaded = PeftModel.from_pretrained(base, out)
    batch = tokenizer(["What is 3 plus 4?"], return_tensors="pt")
    with torch.no_grad():
        tuned = reloaded(**batch).logits
        with reloaded.disable_adapter():
            plain = reloaded(**batch).logits
    assert (tuned - plain).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("load_in_4bit", "method", "agree_min"), [(False, "LoRA", 22), (True, "QLoRA (NF4 base)", 21)])
def test_the_default_demo_teaches_the_pretrained_base_to_answer(load_in_4bit, method, agree_min, zoo_cache, tmp_path):
    """``make demo``'s job (defaults; and with --load-in-4bit, NF4 on CPU): the demo base, pretrained
    on plain text, cannot answer the held-back questions in the chat format before the finetune,
    and answers them after it, from the adapter, the merged 16-bit export and the q8_0 GGUF alike.
    Each is the greedy answer of a seeded run; the thresholds (of 24) leave room for another CPU's
    rounding, and for a merge that adds the adapter to dequantised NF4 weights."""
    messages = []
    with use_backend("torch"):
        result = run_demo(DemoSettings(output_dir=tmp_path / "demo", cache_dir=zoo_cache, load_in_4bit=load_in_4bit),
                          log=messages.append)
    assert len(result.losses) == 40 and result.last_loss < 1.0 < result.first_loss  # logged every 10 steps
    # the first run in a cache pretrains the base first and says so
    report = [m for m in messages if not m.startswith(("demo: pretraining the demo base", "demo: pretrained"))]
    assert report[0].startswith(f"demo: trained the demo base with {method} r=16 for 400 steps"), messages
    assert result.exact("before") <= 1, result.answers["before"]
    for stage in result.answers.keys() - {"before"}:
        assert result.exact(stage) >= 20, (stage, result.answers[stage])
    # the 16-bit merge and q8_0 round the weights; at most a near-tie answer or two may change
    for stage in result.answers.keys() - {"before", "after"}:
        agree = sum(x == y for x, y in zip(result.answers[stage], result.answers["after"]))
        assert agree >= agree_min, (stage, result.answers[stage], result.answers["after"])
    assert sorted(p.name for p in (tmp_path / "demo" / "gguf").glob("*.gguf")) == ["llama-demo.Q4_K_M.gguf",
                                                                                  "llama-demo.Q8_0.gguf"]


def test_demo_refuses_a_non_empty_output_dir_before_training(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        run_demo(DemoSettings(output_dir=tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_demo_refuses_a_vision_model():
    with pytest.raises(ValueError, match="vision-language model"):
        run_demo(DemoSettings(architecture="qwen2_vl"))


@pytest.mark.slow
def test_demo_command_line(zoo_cache, tmp_path):
    out = tmp_path / "cli-demo"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU run
    done = subprocess.run(
        [sys.executable, "-m", "unsloth_like", "demo", "--model", "qwen3", "--max-steps", "3",
         "--output-dir", str(out), "--zoo-cache", str(zoo_cache)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo: trained zoo 'qwen3'" in done.stdout
    assert (out / "adapter_model.safetensors").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "unsloth_like", "demo", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode != 0 and "is not empty; pass --overwrite" in again.stderr


@pytest.mark.slow
def test_demo_takes_a_model_folder_a_dataset_file_and_a_chat_template(zoo_cache, tmp_path):
    """Real use: --model a folder (here a zoo model's), --dataset a jsonl of chats (its last 3 rows
    are held back for the answers), --chat-template a name; the same exports."""
    rows = demo_conversations(24, seed=1)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": chat}) for chat in rows))
    model_dir = zoo_model_dir("qwen2", zoo_cache)
    out = tmp_path / "real"
    with use_backend("torch"):
        result = run_demo(DemoSettings(output_dir=out, model=str(model_dir), dataset=str(data),
                                       chat_template="chatml", max_steps=3, batch_size=4), log=lambda _: None)
    assert result.prompts == [chat[0]["content"] for chat in rows[-3:]]
    assert list(result.answers)[:3] == ["before", "after", "merged"]
    assert sorted(p.name for p in (out / "gguf").glob("*.gguf")) == [f"{model_dir.name}-demo.Q4_K_M.gguf",
                                                                     f"{model_dir.name}-demo.Q8_0.gguf"]
    assert "<|im_start|>" in (out / "merged" / "tokenizer_config.json").read_text() + (
        (out / "merged" / "chat_template.jinja").read_text() if (out / "merged" / "chat_template.jinja").exists() else "")


@pytest.mark.parametrize(("settings", "message"), [
    ({"chat_template": "no-such-template"}, "Unknown chat template 'no-such-template'. Did you mean"),
    ({"dataset": "missing.jsonl"}, "does not exist; pass a json/jsonl/parquet file"),
    ({"dataset": "chats.csv"}, "training reads .json, .jsonl, .parquet files"),
])
def test_demo_refuses_bad_real_use_settings_before_loading(settings, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=message):
        run_demo(DemoSettings(output_dir=tmp_path / "out", model="/nonexistent/model", **settings))


def test_demo_refuses_a_dataset_without_messages_or_text(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(8)))
    with pytest.raises(ValueError, match=r"has columns \['question', 'answer'\]; the demo trains on 'messages'"):
        run_demo(DemoSettings(output_dir=tmp_path / "out", dataset=str(data), cache_dir=tmp_path / "zoo"))
    assert not (tmp_path / "zoo").exists()  # refused before the demo base was built or a model loaded
