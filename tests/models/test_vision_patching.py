"""Patched vs unpatched vision-language models on the same weights, with images in the batch.

The language decoder of every registered VLM family runs our kernels (RMSNorm incl. Gemma's
``1 + weight``, M-RoPE through ``apply_rope`` with per-batch cos/sin, SwiGLU/GeGLU, the fused
loss); the vision tower keeps upstream code except its norms (LayerNorm, or the decoder's RMSNorm
class). In fp32 the loss, every gradient (vision tower included) and the eval logits must match
upstream's to fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from unsloth_like import FastVisionModel
from unsloth_like.models import is_patched, patch_model, unpatch
from unsloth_like.models.registry import supported_vision_model_types
from unsloth_like.testing.processors import vlm_chat_batch
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir

from ..kernels.tolerances import assert_close_normwise

VLMS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "mllama"]


def _pair(name, zoo_cache):
    base, _ = load_zoo_model(name, cache_dir=zoo_cache)
    fast = copy.deepcopy(base)
    patch_model(fast)
    return base, fast


def _train_step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_gradients_close(actual, expected):
    # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by every
    # key): both sides hold rounding noise there, which only needs to stay noise.
    if expected.norm() < 1e-7:
        assert actual.norm() < 1e-6
    else:
        assert_close_normwise(actual, expected, torch.float32, factor=50)  # fp32: ~1e-4 relative


def test_every_zoo_vlm_family_is_registered():
    assert sorted(VLMS) == supported_vision_model_types()


@pytest.mark.parametrize("name", VLMS)
def test_fp32_loss_gradients_and_logits_match_upstream_with_images(name, zoo_cache):
    base, fast = _pair(name, zoo_cache)
    batch = vlm_chat_batch(name, 2, image_sizes=[(56, 56), (84, 56)] if name.startswith("qwen") else (56, 56),
                           labels=True, cache_dir=zoo_cache)
    out_base, grads_base = _train_step(base, batch)
    out_fast, grads_fast = _train_step(fast, batch)
    assert out_fast.logits is None  # the fused loss: no logits in training
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5
    assert grads_fast.keys() == grads_base.keys()
    for param_name, grad in grads_base.items():
        _assert_gradients_close(grads_fast[param_name], grad)
    base.eval(), fast.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits_base, logits_fast = base(**inputs).logits, fast(**inputs).logits
    assert (logits_fast - logits_base).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_lora_gradients_match_plain_peft_with_images(name, zoo_cache):
    import peft

    base, fast = _pair(name, zoo_cache)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    plain = peft.get_peft_model(base, config)
    torch.manual_seed(0)
    unpatch(fast)
    ours = peft.get_peft_model(fast, copy.deepcopy(config))
    patch_model(ours)
    for module in [*plain.modules(), *ours.modules()]:  # non-zero B so that A gets gradients too
        if isinstance(module, torch.nn.Linear) and module.weight.shape[1] == 4:
            torch.nn.init.normal_(module.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    batch = vlm_chat_batch(name, 2, labels=True, cache_dir=zoo_cache)
    out_plain, grads_plain = _train_step(plain, batch)
    out_ours, grads_ours = _train_step(ours, batch)
    assert abs(out_ours.loss.item() - out_plain.loss.item()) <= 1e-5
    lora = [n for n in grads_plain if "lora_" in n]
    assert lora and all(grads_plain[n].abs().sum() > 0 for n in lora)
    for param_name in lora:
        assert_close_normwise(grads_ours[param_name], grads_plain[param_name], torch.float32, factor=50)


def test_gemma3_softcapping_in_the_config_is_not_applied_by_its_multimodal_head(zoo_cache):
    base, fast = _pair("gemma3", zoo_cache)
    for model in (base, fast):
        model.config.get_text_config().final_logit_softcapping = 3.0  # Gemma3ForConditionalGeneration ignores it
    batch = vlm_chat_batch("gemma3", 1, labels=True, cache_dir=zoo_cache)
    out_base, _ = _train_step(base, batch)
    out_fast, _ = _train_step(fast, batch)
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5


def test_positional_arguments_follow_the_heads_own_signature(zoo_cache):
    # Gemma3ForConditionalGeneration.forward(input_ids, pixel_values, attention_mask, ...)
    base, fast = _pair("gemma3", zoo_cache)
    batch = vlm_chat_batch("gemma3", 1, labels=True, cache_dir=zoo_cache)
    for model in (base, fast):
        model.train()
    positional = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    loss_base = base(*positional, **rest).loss
    loss_fast = fast(*positional, **rest).loss
    assert abs(loss_fast.item() - loss_base.item()) <= 1e-5


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_greedy_generation_with_an_image_is_identical(name, zoo_cache):
    base, fast = _pair(name, zoo_cache)
    batch = vlm_chat_batch(name, 1, with_answer=False, add_generation_prompt=True, cache_dir=zoo_cache)
    base.eval(), fast.eval()
    with torch.no_grad():
        expected = base.generate(**batch, max_new_tokens=6, do_sample=False)
        produced = fast.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(produced, expected)


def test_fast_vision_model_patches_only_what_its_class_says(zoo_cache):
    directory = zoo_model_dir("qwen2_vl", zoo_cache)
    model, processor = FastVisionModel.from_pretrained(str(directory), load_in_4bit=False)
    assert is_patched(model)
    assert getattr(processor, "image_processor", None) is not None
    patched = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert any(n.startswith("model.language_model.layers.0.self_attn") for n in patched)
    assert not any(n.startswith("model.visual.blocks") and n.endswith(("attn", "mlp")) for n in patched)
    assert {"model.visual.blocks.0.norm1", "model.visual.blocks.1.norm2", "model.visual.merger.ln_q"} <= set(patched)
