"""Patched vs unpatched HF models on the same weights: logits, loss, gradients, generation.

On CPU-only machines the patched layers run our Triton kernels through the interpreter (see
tests/conftest.py), so these tests exercise the kernels inside real models.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers

from unsloth_like.models import is_patched, patch_model, unpatch
from unsloth_like.testing.zoo import load_zoo_model

from ..kernels.tolerances import assert_close_normwise

TEXT_MODELS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please."]


def _pair(name, zoo_cache, dtype=torch.float32):
    base, tokenizer = load_zoo_model(name, dtype=dtype, cache_dir=zoo_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    fast = copy.deepcopy(base)
    patch_model(fast)
    return base, fast, tokenizer


def _batch(tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _train_step(model, batch, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_fp32_logits_loss_and_every_gradient_match_upstream(name, zoo_cache):
    base, fast, tokenizer = _pair(name, zoo_cache)
    batch = _batch(tokenizer)  # right padding + attention mask
    out_base, grads_base = _train_step(base, batch)
    out_fast, grads_fast = _train_step(fast, batch)
    assert out_fast.logits is None  # training with labels: no logits materialised
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5
    for param_name, grad in grads_base.items():
        assert_close_normwise(grads_fast[param_name], grad, torch.float32, factor=50)  # fp32: ~1e-4 relative
    base.eval(), fast.eval()
    with torch.no_grad():
        logits_base = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits_fast = fast(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (logits_fast - logits_base).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_packed_position_ids_match_upstream(name, zoo_cache):
    base, fast, tokenizer = _pair(name, zoo_cache)
    ids = tokenizer(" ".join(TEXTS), return_tensors="pt")["input_ids"]
    seq = ids.shape[1]
    position_ids = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).unsqueeze(0)
    # use_cache=False: upstream treats per-sequence position_ids as packed sequences (block-diagonal
    # attention) only without a KV cache; our training forward never makes one.
    kwargs = {"input_ids": ids, "position_ids": position_ids, "labels": ids, "use_cache": False}
    out_base, grads_base = _train_step(base, kwargs)
    out_fast, grads_fast = _train_step(fast, kwargs)
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5
    assert_close_normwise(grads_fast["model.embed_tokens.weight"], grads_base["model.embed_tokens.weight"],
                          torch.float32, factor=50)


@pytest.mark.parametrize("name", ["qwen2", "phi3", "gemma2"])
def test_bf16_matches_upstream_within_bf16_precision(name, zoo_cache):
    base, fast, tokenizer = _pair(name, zoo_cache, dtype=torch.bfloat16)
    batch = _batch(tokenizer)
    base.eval(), fast.eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits_base, logits_fast = base(**inputs).logits, fast(**inputs).logits
    # Two layers of bf16 activations, each op rounding once in a different order: a few bf16 ulps.
    assert_close_normwise(logits_fast.float(), logits_base.float(), torch.bfloat16, factor=2)
    out_base, _ = _train_step(base, batch)
    out_fast, _ = _train_step(fast, batch)
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 4 * 2**-8 * out_base.loss.item()


def test_num_items_in_batch_gives_the_gradient_accumulation_mean(zoo_cache):
    base, fast, tokenizer = _pair("llama", zoo_cache)
    batch = _batch(tokenizer)
    n_items = torch.tensor(37)
    out_base, _ = _train_step(base, batch, num_items_in_batch=n_items)
    out_fast, _ = _train_step(fast, batch, num_items_in_batch=n_items)
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5


def test_logits_are_returned_on_demand(zoo_cache):
    _, fast, tokenizer = _pair("qwen3", zoo_cache)
    batch = _batch(tokenizer)
    fast.train()
    assert fast(**batch).logits is None
    assert fast(**batch, return_logits=True).logits.shape[-1] == fast.config.vocab_size
    with torch.no_grad():
        assert fast(**batch).logits is not None  # no grad: nothing to fuse for
    fast.config.unsloth_return_logits = True
    assert fast(**batch).logits is not None
    fast.config.unsloth_return_logits = False
    fast.eval()
    assert fast(**batch).logits is not None and fast(**batch).loss is not None


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_generation_is_identical(name, zoo_cache):
    base, fast, tokenizer = _pair(name, zoo_cache)
    prompt = tokenizer(["What is 3 plus 4?"], return_tensors="pt")
    base.eval(), fast.eval()
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(base.generate(**prompt, **kwargs), fast.generate(**prompt, **kwargs))


def test_patching_is_per_instance_and_unpatch_restores_upstream(zoo_cache):
    upstream_class_forward = transformers.LlamaForCausalLM.forward
    base, fast, tokenizer = _pair("llama", zoo_cache)
    assert is_patched(fast) and not is_patched(base)
    assert transformers.LlamaForCausalLM.forward is upstream_class_forward
    assert not any("forward" in module.__dict__ for module in base.modules())
    fresh, _ = load_zoo_model("llama", cache_dir=zoo_cache)  # created after the patch
    assert not any("forward" in module.__dict__ for module in fresh.modules())
    patched_count = sum("forward" in module.__dict__ for module in fast.modules())
    assert patched_count == 1 + 3 * (2 + 1 + 1) + 1  # lm wrapper + per layer 2 norms, attention, mlp + final norm
    unpatch(fast)
    assert not is_patched(fast)
    assert not any("forward" in module.__dict__ for module in fast.modules())
    batch = _batch(tokenizer)
    fast.eval(), base.eval()
    with torch.no_grad():
        assert torch.equal(fast(**batch).logits, base(**batch).logits)


def test_qwen3_qk_norms_are_patched_too(zoo_cache):
    _, fast, _ = _pair("qwen3", zoo_cache)
    attention = fast.model.layers[0].self_attn
    assert "forward" in attention.q_norm.__dict__ and "forward" in attention.k_norm.__dict__


def test_gemma2_soft_capping_is_applied_like_upstream(zoo_cache):
    """Random weights keep attention scores and logits far below Gemma 2's caps (50 and 30), where
    tanh capping is the identity to fp32 rounding; caps of 0.05 and 0.5 make both bite. The
    patched model must match upstream there, and differ from the uncapped model (so a dropped cap
    fails this test)."""
    base, fast, tokenizer = _pair("gemma2", zoo_cache)
    for model in (base, fast):  # SDPA cannot soft-cap (transformers before 5.24 dropped the cap there)
        model.set_attn_implementation("eager")
    uncapped = copy.deepcopy(fast)
    for model, cap in ((base, 0.05), (fast, 0.05), (uncapped, None)):
        model.config.final_logit_softcapping = None if cap is None else 0.5
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = cap
    batch = _batch(tokenizer)
    out_base, grads_base = _train_step(base, batch)
    out_fast, grads_fast = _train_step(fast, batch)
    out_uncapped, _ = _train_step(uncapped, batch)
    assert abs(out_fast.loss.item() - out_base.loss.item()) <= 1e-5
    assert abs(out_uncapped.loss.item() - out_base.loss.item()) > 1e-2
    for param_name, grad in grads_base.items():
        assert_close_normwise(grads_fast[param_name], grad, torch.float32, factor=50)


def test_models_load_with_the_attention_their_architecture_supports(zoo_cache):
    from unsloth_like import FastLanguageModel
    from unsloth_like.testing.zoo import zoo_model_dir

    gemma2, _ = FastLanguageModel.from_pretrained(str(zoo_model_dir("gemma2", zoo_cache)), load_in_4bit=False)
    llama, _ = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    assert (gemma2.config._attn_implementation, llama.config._attn_implementation) == ("eager", "sdpa")


def test_patch_is_idempotent(zoo_cache):
    _, fast, _ = _pair("mistral", zoo_cache)
    records = len(fast._unsloth_like_patched)
    patch_model(fast)
    assert len(fast._unsloth_like_patched) == records


def test_unknown_architecture_stays_upstream_with_a_warning(caplog):
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=101, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    with caplog.at_level(logging.WARNING, logger="unsloth_like.models.patching"):
        assert patch_model(model) is None
    assert "no patch for model_type 'gpt2'" in caplog.text and "rms_norm" in caplog.text
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_patched_4bit_matches_unpatched_4bit(zoo_cache):
    base, tokenizer = load_zoo_model("llama", load_in_4bit=True, cache_dir=zoo_cache)
    fast, _ = load_zoo_model("llama", load_in_4bit=True, cache_dir=zoo_cache)
    patch_model(fast)
    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base.train(), fast.train()  # bitsandbytes repacks CPU weights on the first eval forward: stay in train
    assert_close_normwise(fast(**inputs).logits, base(**inputs).logits, torch.float32, factor=50)


def test_unpatch_leaves_a_forward_someone_else_wrapped_ours_in(zoo_cache):
    """TRL's trainers wrap the model's forward in their fused LM head (``add_fused_lm_head``) after
    we patched it; unpatching then restores the layers and leaves TRL's forward, which keeps
    calling the forward it wrapped."""
    import trl.trainer.utils

    add_fused_lm_head = getattr(trl.trainer.utils, "add_fused_lm_head", None)  # TRL >= 1.11
    base, fast, tokenizer = _pair("qwen2", zoo_cache)
    if add_fused_lm_head is not None:
        add_fused_lm_head(fast)
    else:  # an older TRL: the same situation, wrapped by hand
        ours = fast.forward
        fast.forward = lambda *args, **kwargs: ours(*args, **kwargs)
    their_forward = fast.__dict__["forward"]
    unpatch(fast)
    assert fast.__dict__["forward"] is their_forward
    assert not any("forward" in module.__dict__ for module in fast.model.modules())
    batch = _batch(tokenizer)
    fast.eval(), base.eval()
    with torch.no_grad():
        assert torch.allclose(fast(**batch).logits, base(**batch).logits, atol=1e-5)
        if add_fused_lm_head is not None:
            fused = fast(**batch, fused_lm_head=True).log_probs
            assert fused.shape == batch["input_ids"][:, 1:].shape
