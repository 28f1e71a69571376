"""``unsloth-like train``: Unsloth's notebook flow from flags or a YAML/JSON config (flags win),
the adapter in ``<output-dir>/lora``, checkpoints that ``--resume`` continues from; bad settings
are one sentence and exit status 2 before anything is loaded."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
import transformers
import yaml

from unsloth_like.cli import main as cli_main
from unsloth_like.kernels import use_backend
from unsloth_like.testing.corpus import demo_conversations
from unsloth_like.testing.zoo import zoo_model_dir
from unsloth_like.train_job import make_settings, run_training


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": chat}) for chat in demo_conversations(16, seed=2)))
    return path


def _small(model_dir, chats, out) -> dict:
    return {"model": str(model_dir), "dataset": str(chats), "output_dir": str(out), "load_in_4bit": False,
            "max_seq_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "optim": "adamw_torch", "warmup_steps": 0}


def test_train_from_flags_writes_an_adapter_peft_loads(zoo_cache, chats, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", str(zoo_model_dir("qwen2", zoo_cache)), "--dataset", str(chats), "--output-dir", str(out),
            "--no-load-in-4bit", "--max-seq-length", "64", "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optim", "adamw_torch", "--max-steps", "2", "--r", "4",
            "--chat-template", "chatml", "--train-on-responses-only", "--target-modules", "q_proj", "v_proj"]
    with use_backend("torch"):
        assert cli_main(argv) == 0
    config = peft.PeftConfig.from_pretrained(out / "lora")
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert (out / "lora" / "adapter_model.safetensors").is_file() and (out / "lora" / "tokenizer_config.json").is_file()
    assert json.loads((out / "train_settings.json").read_text())["train_on_responses_only"] is True


def test_export_after_training_writes_what_a_separate_export_would(zoo_cache, chats, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", str(zoo_model_dir("llama", zoo_cache)), "--dataset", str(chats), "--output-dir",
            str(out), "--no-load-in-4bit", "--max-seq-length", "64", "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optim", "adamw_torch", "--max-steps", "1",
            "--export", "merged_16bit", "gguf", "--quantization", "q4_k_m", "q8_0"]
    with use_backend("torch"):
        assert cli_main(argv) == 0
    ours = transformers.AutoModelForCausalLM.from_pretrained(out / "merged_16bit").state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("llama", zoo_cache), dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, out / "lora").merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    assert max((ours[k].float() - reference[k].float()).abs().max().item() for k in ours) <= 1e-6  # fp32 merge
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["Modelfile", "gguf.Q4_K_M.gguf", "gguf.Q8_0.gguf"]


def test_a_config_file_with_flags_over_it_and_resume(zoo_cache, chats, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**_small(zoo_model_dir("llama", zoo_cache), chats, out), "max_steps": 9,
                                      "save_steps": 1}))
    settings = make_settings(yaml.safe_load(config.read_text()), {"max_steps": 2, "resume": None})
    assert settings.max_steps == 2 and settings.save_steps == 1  # the flag over the file, the file over defaults
    with use_backend("torch"):
        first = run_training(settings, log=lambda _: None)
        assert first.state.global_step == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
        resumed = run_training(make_settings(yaml.safe_load(config.read_text()), {"max_steps": 3, "resume": True}),
                               log=lambda _: None)
    assert resumed.state.global_step == 3
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2, 3]  # restored, then 3


@pytest.mark.parametrize(("config", "flags", "message"), [
    ({"modle": "x"}, [], r"Unknown setting\(s\) \['modle'\]"),
    ({}, [], "Both model and dataset are required"),
    ({"r": "sixteen"}, ["--model", "m", "--dataset", "d"], "r must be of type int, got 'sixteen'"),
    ({"chat_template": "nope"}, ["--model", "m", "--dataset", "hub/id"], "Unknown chat template 'nope'"),
    ({"train_on_responses_only": True}, ["--model", "m", "--dataset", "hub/id"], "needs chat_template"),
    ({"resume": True}, ["--model", "m", "--dataset", "hub/id"], "holds no checkpoint; run without resume first"),
    ({}, ["--model", "m", "--dataset", "missing.jsonl"], "does not exist"),
    ({}, ["--model", "m", "--dataset", "hub/id", "--export", "onnx"], "Unknown export format 'onnx'; export takes"),
    ({"quantization": ["q4_k_m"]}, ["--model", "m", "--dataset", "hub/id"], "export must include gguf"),
    ({}, ["--model", "m", "--dataset", "hub/id", "--export", "gguf", "--quantization", "q9_k"],
     r"Unknown quantization_method 'q9_k'\. Did you mean"),
    ({"export": 5}, ["--model", "m", "--dataset", "hub/id"], "export must be a list of names, got 5"),
    ({"export": "onnx"}, ["--model", "m", "--dataset", "hub/id"], "Unknown export format 'onnx'"),  # one name: a list
])
def test_bad_settings_are_refused_before_loading(config, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(config))
    assert cli_main(["train", "--config", str(tmp_path / "train.json"), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
