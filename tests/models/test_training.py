"""Training with patched models: loss curves against upstream, and TRL's SFTTrainer on top.

A training step of a patched model through the Triton *interpreter* takes ~25 s on 2 CPU cores
(vs 0.1 s upstream), so multi-step runs here use the kernels' torch references
(``use_backend("torch")``): they check the patched model's plumbing over many optimizer steps
(fused-loss chunking, label shifting, per-instance forwards under an optimizer, TRL's wrapper).
The kernels' own numerics inside these models are covered by test_patching.py (interpreted) and
by the GPU-marked run below (compiled).
"""

from __future__ import annotations

import copy

import pytest
import torch

from unsloth_like.kernels import use_backend
from unsloth_like.models import patch_model
from unsloth_like.testing.corpus import demo_conversations
from unsloth_like.testing.zoo import load_zoo_model


def _losses(model, batches, steps):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _curves(zoo_cache, device="cpu", steps=30):
    base, tokenizer = load_zoo_model("qwen3", cache_dir=zoo_cache)
    base.to(device)
    fast = copy.deepcopy(base)
    patch_model(fast)
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in demo_conversations(24, seed=1)]
    batches = []
    for start in range(0, len(texts), 4):
        batch = tokenizer(texts[start:start + 4], return_tensors="pt", padding=True)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch.to(device))
    return _losses(base, batches, steps), _losses(fast, batches, steps)


def _sft_losses(model, tokenizer, output_dir, steps=3):
    """Losses of a short TRL SFTTrainer run on the demo chats (CPU, fp32)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                       bf16=False, use_cpu=True, max_length=64, seed=0, disable_tqdm=True)
    dataset = Dataset.from_dict({"messages": demo_conversations(12, seed=2)})
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_within_1_percent(upstream, ours):
    assert upstream[-1] < upstream[0] - 1.0  # it does learn
    for step, (a, b) in enumerate(zip(upstream, ours)):
        assert abs(a - b) <= 0.01 * a, f"step {step}: upstream {a:.5f} vs patched {b:.5f}"


def test_30_steps_track_the_upstream_loss_curve_within_1_percent(zoo_cache):
    with use_backend("torch"):
        _assert_within_1_percent(*_curves(zoo_cache))


@pytest.mark.gpu
def test_30_steps_with_compiled_kernels_track_upstream_within_1_percent(zoo_cache):
    _assert_within_1_percent(*_curves(zoo_cache, device="cuda"))


@pytest.mark.slow
def test_trl_sft_trainer_trains_a_patched_model_like_upstream(zoo_cache, tmp_path):
    """TRL 1.16 installs its own fused LM head (``add_fused_lm_head``) around ``model.forward`` and
    computes the SFT loss from the backbone's hidden states, so our fused loss is not used under
    SFTTrainer and the two never both run; the patched layers still are. Same losses as upstream."""
    def train(model, tokenizer, name):
        return _sft_losses(model, tokenizer, tmp_path / name)

    base, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    fast = copy.deepcopy(base)
    patch_model(fast)
    with use_backend("torch"):
        upstream, ours = train(base, tokenizer, "upstream"), train(fast, tokenizer, "patched")
    assert len(ours) == 3
    for a, b in zip(upstream, ours):
        assert abs(a - b) <= 1e-3 * a


@pytest.mark.slow
def test_trl_sft_trainer_trains_get_peft_model_qlora_like_plain_peft(zoo_cache, tmp_path):
    """QLoRA through SFTTrainer with TRL's defaults: gradient checkpointing requested by the
    Trainer (our "unsloth" mode stays), adapters cast to bf16 by TRL for quantised models (the
    fused path follows), the same losses as plain PEFT on the same 4-bit base."""
    import peft

    from unsloth_like import FastLanguageModel
    from unsloth_like.models.checkpointing import checkpointing_mode
    from unsloth_like.models.patching import lora_fusion_report

    def train(model, tokenizer, name):
        return _sft_losses(model, tokenizer, tmp_path / name)

    with use_backend("torch"):
        base, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache, load_in_4bit=True)
        patch_model(base)
        fast = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=16, random_state=0)
        plain_base, _ = load_zoo_model("qwen2", cache_dir=zoo_cache, load_in_4bit=True)
        plain = peft.get_peft_model(plain_base, peft.LoraConfig(
            r=8, lora_alpha=16, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(fast))
        ours, upstream = train(fast, tokenizer, "ours"), train(plain, tokenizer, "plain")
    assert checkpointing_mode(fast) == "unsloth"
    assert set(lora_fusion_report(fast).values()) == {"fused"}
    assert next(p for n, p in fast.named_parameters() if "lora_A" in n).dtype == torch.bfloat16
    assert len(ours) == 3
    for a, b in zip(upstream, ours):
        assert abs(a - b) <= 1e-3 * a
