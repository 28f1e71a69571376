"""save_pretrained_merged: the merged checkpoint, reloaded by plain transformers, is the LoRA model."""

from __future__ import annotations

import collections
import json
import logging
import os
import socket

import peft
import pytest
import torch
import transformers

from unsloth_like import FastLanguageModel
from unsloth_like.kernels import use_backend
from unsloth_like.testing.zoo import zoo_model_dir

PROMPTS = ["What is 3 plus 4?", "Describe a red kite."]


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _trained(name, zoo_cache, load_in_4bit=False, **lora):
    """A LoRA model whose adapters moved away from their zero start (as after training)."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir(name, zoo_cache)),
                                                         load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False, **lora)
    move_trainable(model)
    return model, tokenizer


def move_trainable(model, seed: int = 0) -> None:
    """Move every trainable parameter off its start (zero-initialised B, copied rows), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.02)


def _inputs(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _logits_and_greedy(model, tokenizer):
    model.eval()
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return logits, tokens


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_merged_16bit_reloads_as_the_lora_model(name, zoo_cache, tmp_path):
    model, tokenizer = _trained(name, zoo_cache, use_rslora=name == "qwen3")
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(reloaded.config, "quantization_config")
    expected_logits, expected_tokens = _logits_and_greedy(model, tokenizer)
    logits, tokens = _logits_and_greedy(reloaded, transformers.AutoTokenizer.from_pretrained(out))
    assert (expected_logits - logits).abs().max() <= 1e-4
    assert torch.equal(tokens, expected_tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_saved_generation_config_stops_at_the_chat_templates_eos(zoo_cache, tmp_path):
    from unsloth_like.chat_templates import get_chat_template

    model, tokenizer = _trained("llama", zoo_cache)
    # A base checkpoint (Llama-3.1-8B's own generation_config) stops at end-of-text only.
    model.get_base_model().generation_config.eos_token_id = base_eos = tokenizer.eos_token_id
    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [base_eos, eot]
    assert model.get_base_model().generation_config.eos_token_id == base_eos  # the live model is untouched


def test_qlora_merges_onto_the_original_16bit_weights(zoo_cache, tmp_path, caplog):
    """A 4-bit load of a local 16-bit checkpoint: the merge lands on the original weights (not on
    dequantised NF4), so the result equals the 16-bit base with the same adapter."""
    model, tokenizer = _trained("llama", zoo_cache, load_in_4bit=True)
    with caplog.at_level(logging.INFO, logger="unsloth_like"):
        out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert any("original weights" in r.getMessage() for r in caplog.records)
    base16 = transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("llama", zoo_cache))
    reference = peft.get_peft_model(base16, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]))
    peft.set_peft_model_state_dict(reference, {k: v.float() for k, v in peft.get_peft_model_state_dict(model).items()})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    expected, _ = _logits_and_greedy(reference, tokenizer)
    logits, _ = _logits_and_greedy(reloaded, tokenizer)
    assert (expected - logits).abs().max() <= 1e-4


def test_trained_tied_embeddings_are_untied_and_sharded(zoo_cache, tmp_path):
    """qwen2 ties lm_head to the embeddings; a trained lm_head copy (modules_to_save) must be
    written on its own. Small shards exercise the index."""
    model, tokenizer = _trained("qwen2", zoo_cache, modules_to_save=["lm_head"])
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer, max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = collections.Counter(index["weight_map"].values())
    assert len(files) > 2 and "lm_head.weight" in index["weight_map"]
    # a shard holds at most 300 KB of tensors, unless one tensor alone is bigger (the embedding)
    assert all(count == 1 or os.path.getsize(out / f) <= 300_000 + 16_384 for f, count in files.items())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.tie_word_embeddings is False
    expected, _ = _logits_and_greedy(model, tokenizer)
    logits, _ = _logits_and_greedy(reloaded, tokenizer)
    assert (expected - logits).abs().max() <= 1e-4


def test_in_memory_merge_without_a_local_checkpoint(zoo_cache, tmp_path):
    model, tokenizer = _trained("qwen3", zoo_cache)
    model.get_base_model().config._name_or_path = "someone/not-on-disk"
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    expected, _ = _logits_and_greedy(model, tokenizer)
    logits, _ = _logits_and_greedy(transformers.AutoModelForCausalLM.from_pretrained(out), tokenizer)
    assert (expected - logits).abs().max() <= 1e-4


def test_lora_method_reloads_with_plain_peft(zoo_cache, tmp_path):
    model, tokenizer = _trained("mistral", zoo_cache)
    out = model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    plain = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("mistral", zoo_cache)), out)
    expected, _ = _logits_and_greedy(model, tokenizer)
    logits, _ = _logits_and_greedy(plain, tokenizer)
    assert (expected - logits).abs().max() <= 1e-4


def test_bad_input_is_refused_before_any_write(zoo_cache, tmp_path, monkeypatch):
    model, tokenizer = _trained("qwen2", zoo_cache)
    with pytest.raises(ValueError, match=r"one of \('lora', 'merged_16bit', 'merged_4bit', 'merged_4bit_forced'\), got 'merged_8bit'"):
        model.save_pretrained_merged(tmp_path / "a", tokenizer, save_method="merged_8bit")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained_merged(tmp_path / "a", tokenizer, max_shard_size="lots")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained_merged(occupied, tokenizer)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anyway
            with pytest.raises(PermissionError, match="Cannot write"):
                model.save_pretrained_merged(locked / "out", tokenizer)
    finally:
        locked.chmod(0o700)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OSError, match="Not enough disk space"):
        model.save_pretrained_merged(tmp_path / "full", tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "occupied"]


def test_overwrite_replaces_an_existing_directory(zoo_cache, tmp_path):
    model, tokenizer = _trained("qwen2", zoo_cache)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    model.save_pretrained_merged(target, tokenizer, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()


def test_dora_merges_like_peft(zoo_cache, tmp_path):
    """DoRA magnitudes: the merged checkpoint computes what the DoRA model computes."""
    model, tokenizer = _trained("qwen2", zoo_cache, use_dora=True)
    out = model.save_pretrained_merged(tmp_path / "out", tokenizer)
    expected, expected_tokens = _logits_and_greedy(model, tokenizer)
    logits, tokens = _logits_and_greedy(transformers.AutoModelForCausalLM.from_pretrained(out), tokenizer)
    assert (expected - logits).abs().max() <= 1e-4 and torch.equal(tokens, expected_tokens)


def test_unsupported_adapters_are_refused_with_a_pointer_to_lora_saves(zoo_cache, tmp_path):
    model, tokenizer = _trained("llama", zoo_cache, lora_bias=True)
    with pytest.raises(ValueError, match="save_method='lora'"):
        model.save_pretrained_merged(tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()


KILL_MID_SAVE = """
import os, signal, sys
from unsloth_like import FastLanguageModel
from unsloth_like.save import merge
from unsloth_like.testing.zoo import zoo_model_dir

model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", sys.argv[1])), load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
real_flush = merge.ShardWriter.flush

def flush_then_die(self):
    real_flush(self)
    if len(self.shards) == 2:  # some shards written, the rest not
        os.kill(os.getpid(), signal.SIGKILL)

merge.ShardWriter.flush = flush_then_die
model.save_pretrained_merged(sys.argv[2], tokenizer, max_shard_size="300KB")
"""


@pytest.mark.slow
def test_a_save_killed_midway_leaves_no_target_directory(zoo_cache, tmp_path, caplog):
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    target = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(zoo_cache), str(target)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not target.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.staging-")]
    assert len(staging) == 1 and any(staging[0].glob(".shard-*"))  # the killed work, hidden and incomplete

    # The next save to that target clears what the dead process left, and only that.
    running = tmp_path / f".merged.staging-{socket.gethostname()}-{os.getpid()}-live"
    other_host = tmp_path / ".merged.staging-elsewhere-1-remote"
    running.mkdir(), other_host.mkdir()
    model, tokenizer = _trained("qwen2", zoo_cache)
    with caplog.at_level(logging.WARNING, logger="unsloth_like"):
        model.save_pretrained_merged(target, tokenizer)
    assert not staging[0].exists() and running.exists() and other_host.exists()
    assert any("killed" in r.getMessage() and staging[0].name in r.getMessage() for r in caplog.records)
    assert (target / "config.json").exists()


@pytest.mark.parametrize("method", ["merged_4bit", "merged_4bit_forced"])
def test_merged_4bit_reloads_with_bitsandbytes(method, zoo_cache, tmp_path, caplog):
    """The 4-bit checkpoint is the merged 16-bit one quantised to NF4: it reloads pre-quantised and
    computes what the merged 16-bit checkpoint computes when loaded in 4-bit. Compared in train mode
    under no_grad: on CPU an eval-mode forward makes bitsandbytes repack its weights."""
    model, tokenizer = _trained("llama", zoo_cache)
    with caplog.at_level(logging.WARNING, logger="unsloth_like"):
        out = model.save_pretrained_merged(tmp_path / "q", tokenizer, save_method=method)
    assert any("4 bits" in r.getMessage() for r in caplog.records)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert not (out / ".merged-16bit").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.is_loaded_in_4bit
    merged16 = model.save_pretrained_merged(tmp_path / "m16", tokenizer)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        merged16, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]))
    inputs = _inputs(tokenizer)
    reloaded.train(), reference.train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-5)


def test_qlora_without_its_16bit_checkpoint_merges_onto_dequantised_weights(zoo_cache, tmp_path, caplog):
    """No local 16-bit checkpoint: the merge starts from the NF4 weights dequantised (bit-exact),
    so the merged model computes what the QLoRA model computes."""
    model, tokenizer = _trained("llama", zoo_cache, load_in_4bit=True)
    model.get_base_model().config._name_or_path = "someone/not-on-disk"
    with caplog.at_level(logging.INFO, logger="unsloth_like"):
        out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert any("dequantised NF4" in r.getMessage() for r in caplog.records)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    inputs = _inputs(tokenizer)
    model.train(), reloaded.eval()  # train mode under no_grad: no CPU repacking of the 4-bit weights
    with torch.no_grad():
        expected, logits = model(**inputs).logits, reloaded(**inputs).logits
    assert (expected - logits).abs().max() <= 1e-4


def test_resized_vocabulary_with_trained_embeddings(zoo_cache, tmp_path):
    """New tokens: the embedding and lm_head grew beyond the checkpoint's; the merged checkpoint
    takes the grown, trained tensors from memory and reloads with the new vocabulary."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    old_rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens(["<think>", "</think>"])
    model.resize_token_embeddings(old_rows + 2)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False,
                                             modules_to_save=["embed_tokens", "lm_head"])
    move_trainable(model, seed=1)
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.get_input_embeddings().num_embeddings == old_rows + 2
    inputs = tokenizer(["<think> What is 3 plus 4? </think>"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected, logits = model(**inputs).logits, reloaded(**inputs).logits
    assert (expected - logits).abs().max() <= 1e-4
