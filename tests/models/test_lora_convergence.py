"""30 training steps, LoRA and QLoRA: our fused path vs plain HF + PEFT from the same start.

Loss curves must agree within 1% at every step, training must actually lower the loss, and the
adapter we train must reload into plain PEFT on a plain HF model with the same outputs.
"""

from __future__ import annotations

import peft
import pytest
import torch

from unsloth_like.kernels import use_backend
from unsloth_like.testing.corpus import demo_conversations
from unsloth_like.testing.zoo import load_zoo_model

from .test_lora import _pair

STEPS = 30


def _batches(tokenizer, n_batches=6, batch_size=4, max_length=48):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    texts = [" ".join(turn["content"] for turn in conversation) for conversation in demo_conversations(24)]
    batches = []
    for i in range(n_batches):
        chunk = texts[i * batch_size:(i + 1) * batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def _train(model, batches):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("name", ["llama", "phi3", "gemma2", "gemma3_text"])
def test_loss_curves_match_and_adapter_reloads_into_plain_peft(name, quantized, zoo_cache, tmp_path):
    with use_backend("torch"):
        fast, plain, tokenizer = _pair(name, zoo_cache, load_in_4bit=quantized, perturb=False)
        batches = _batches(tokenizer)
        fast_losses, plain_losses = _train(fast, batches), _train(plain, batches)
        for step, (ours, theirs) in enumerate(zip(fast_losses, plain_losses)):
            assert abs(ours - theirs) <= 0.01 * theirs, f"step {step}: {ours:.5f} vs {theirs:.5f}"
        assert fast_losses[-1] < 0.9 * fast_losses[0]  # it learns (lr 3e-3, 30 steps: about -20%)

        fast.save_pretrained(tmp_path / "adapter")
        fresh, _ = load_zoo_model(name, cache_dir=zoo_cache, load_in_4bit=quantized)
        reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
        batch = {k: v for k, v in batches[0].items() if k != "labels"}
        # Train mode under no_grad: a 4-bit CPU layer must not see an eval-mode forward (see zoo.py).
        fast.train(), reloaded.train()
        with torch.no_grad():
            ours, theirs = fast(**batch).logits, reloaded(**batch).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
