"""Parameters a distributed engine splits (``models.sharding``), seen without the engine: DeepSpeed
ZeRO-3 marks each parameter it partitions with ``ds_id`` (and keeps an empty local tensor), so a
marked parameter must send every fused path that would read it directly (fused LoRA groups, our
fused loss, our head under TRL's fused LM head) to the modules whose own forward DeepSpeed's hooks
gather for. The multi-process runs are in tests/distributed (FSDP2, ZeRO-2/3)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from unsloth_like import FastLanguageModel
from unsloth_like.models import patch_model, trl_head
from unsloth_like.models.patching import lora_fusion_report
from unsloth_like.models.sharding import fsdp_unit, is_zero3_partitioned, module_class, only_fsdp_hooks
from unsloth_like.testing.zoo import load_zoo_model

ZERO3 = "parameters partitioned by DeepSpeed ZeRO-3: PEFT's modules run, which gather them"


def _mark_zero3(param: nn.Parameter, ds_id: int) -> None:
    param.ds_id = ds_id  # what deepspeed.zero.Init sets on every parameter it partitions


def _batch(tokenizer):
    batch = tokenizer(["Name three rivers of Europe.", "What is 3 plus 4?"], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def test_zero3_partitioned_lora_groups_run_peft_modules(zoo_cache):
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    patch_model(base)
    model = FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[1]
    _mark_zero3(layer.mlp.down_proj.lora_B.default.weight, 1)
    _mark_zero3(layer.self_attn.o_proj.base_layer.weight, 2)
    report = lora_fusion_report(model)
    assert report["base_model.model.model.layers.1.mlp"] == ZERO3
    assert report["base_model.model.model.layers.1.self_attn.o_proj"] == ZERO3
    assert report["base_model.model.model.layers.1.self_attn.qkv"] == "fused"
    assert report["base_model.model.model.layers.0.mlp"] == "fused"


def test_zero3_partitioned_lm_head_makes_the_loss_call_the_head(zoo_cache):
    model, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    patch_model(model)
    model.train()
    batch = _batch(tokenizer)
    fused = model(**batch)
    assert fused.logits is None  # our fused loss: no logits
    _mark_zero3(model.lm_head.weight, 3)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    upstream = model(**batch)
    assert calls and upstream.logits is not None  # the head's own forward ran (where DeepSpeed gathers it)
    torch.testing.assert_close(upstream.loss, fused.loss, rtol=1e-5, atol=0)


def test_zero3_partitioned_head_is_left_to_trls_fused_head(zoo_cache, monkeypatch):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this TRL has no fused LM head (added in TRL 1.11)")
    model, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    patch_model(model)
    model.train()
    trl_utils.add_fused_lm_head(model)
    assert trl_head.take_over_fused_lm_head(types.SimpleNamespace(model=model)) == 1
    ours = []
    kernel = trl_head.token_log_probs
    monkeypatch.setattr(trl_head, "token_log_probs", lambda *a, **k: ours.append(1) or kernel(*a, **k))
    batch = _batch(tokenizer)
    whole = model(**batch, fused_lm_head=True)
    assert ours == [1]
    _mark_zero3(model.lm_head.weight, 4)  # tied: the embedding's too
    partitioned = model(**batch, fused_lm_head=True)
    assert ours == [1]  # TRL's own path ran (it gathers a ZeRO-3 head itself)
    torch.testing.assert_close(partitioned.loss, whole.loss, rtol=1e-5, atol=0)


def test_helpers_outside_any_engine():
    linear = nn.Linear(3, 2)
    assert fsdp_unit(linear) is None and module_class(linear) is nn.Linear
    assert not is_zero3_partitioned(linear.weight)
    assert only_fsdp_hooks(linear)
    linear.register_forward_hook(lambda *args: None)  # anyone's hook but FSDP2's
    assert not only_fsdp_hooks(linear)
