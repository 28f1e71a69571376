"""QLoRA with another ``bnb_4bit_quant_storage`` (FSDP needs the compute dtype): the packed bytes
are the same as with uint8 storage, so loading, training, merging and GGUF export must give the
same results, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import bitsandbytes as bnb
from unsloth_like import FastLanguageModel
from unsloth_like.kernels import use_backend
from unsloth_like.models.patching import lora_fusion_report
from unsloth_like.testing.zoo import zoo_model_dir

from .test_save_merged import move_trainable

TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please."]


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _load(zoo_cache, storage):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage)
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 21 and {m.weight.dtype for m in layers} == {storage}
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    assert set(lora_fusion_report(model).values()) == {"fused"}
    return model, tokenizer


def _step(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _gguf_tensors(path) -> dict:
    return {t.name: (t.tensor_type, np.asarray(t.data).view(np.uint8).copy()) for t in gguf.GGUFReader(path).tensors}


def test_bf16_quant_storage_trains_merges_and_exports_like_uint8(zoo_cache, tmp_path):
    model, tokenizer = _load(zoo_cache, torch.bfloat16)
    reference, _ = _load(zoo_cache, torch.uint8)
    # PEFT 0.18 creates a bf16-storage layer's adapters in bf16 before upcasting them (rounded
    # starting values); newer PEFT does not. The same adapters on both, so storage alone differs.
    peft.set_peft_model_state_dict(reference, peft.get_peft_model_state_dict(model))
    for (name, ours), (_, theirs) in zip(model.named_modules(), reference.named_modules()):
        if isinstance(ours, bnb.nn.Linear4bit):
            assert torch.equal(ours.weight.data.view(torch.uint8).reshape(-1), theirs.weight.data.reshape(-1)), name

    loss, grads = _step(model, tokenizer)
    expected_loss, expected_grads = _step(reference, tokenizer)
    assert loss.item() == expected_loss.item()
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name

    move_trainable(model), move_trainable(reference)
    for name in (model, reference):  # no local 16-bit checkpoint: the merge dequantises the NF4 weights
        name.get_base_model().config._name_or_path = "someone/not-on-disk"
    merged = load_file(model.save_pretrained_merged(tmp_path / "bf16", tokenizer) / "model.safetensors")
    expected = load_file(reference.save_pretrained_merged(tmp_path / "u8", tokenizer) / "model.safetensors")
    assert merged.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor), key

    [ours_gguf] = model.save_pretrained_gguf(tmp_path / "gguf-bf16", tokenizer, quantization_method="q8_0")
    [their_gguf] = reference.save_pretrained_gguf(tmp_path / "gguf-u8", tokenizer, quantization_method="q8_0")
    ours_tensors, their_tensors = _gguf_tensors(ours_gguf), _gguf_tensors(their_gguf)
    assert list(ours_tensors) == list(their_tensors)
    for key, (qtype, data) in their_tensors.items():
        assert ours_tensors[key][0] == qtype and np.array_equal(ours_tensors[key][1], data), key


def test_bf16_quant_storage_merges_onto_the_original_weights(zoo_cache, tmp_path):
    """With the local 16-bit checkpoint at hand the merge reads it, whatever the storage: the merged
    model is the 16-bit base with the same adapter."""
    model, tokenizer = _load(zoo_cache, torch.bfloat16)
    move_trainable(model)
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    base16 = transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("llama", zoo_cache))
    reference = peft.get_peft_model(base16, model.peft_config["default"])
    peft.set_peft_model_state_dict(reference, peft.get_peft_model_state_dict(model))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    reference.eval(), reloaded.eval()
    with torch.no_grad():
        assert (reference(**inputs).logits - reloaded(**inputs).logits).abs().max() <= 1e-4
