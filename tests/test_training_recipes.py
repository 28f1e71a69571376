"""Training recipes through the Trainer: exact gradient accumulation, eval with real logits.

Gradient accumulation must be exact: the loss of a step divides by the number of label tokens
across all its micro-batches (``num_items_in_batch``), so 4 micro-batches of 2 give the update of
one batch of 8 (fp32, plain SGD so the update is the gradient itself).
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from unsloth_like import FastLanguageModel  # noqa: E402
from unsloth_like.kernels import use_backend  # noqa: E402
from unsloth_like.models import patch_model  # noqa: E402
from unsloth_like.models.lora import DEFAULT_TARGET_MODULES  # noqa: E402
from unsloth_like.testing.corpus import demo_conversations  # noqa: E402
from unsloth_like.testing.zoo import load_zoo_model  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _lora_model(zoo_cache):
    model, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    patch_model(model)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B, so every adapter weight gets a gradient
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    return model, tokenizer


def _conversations(n=8):
    # varied lengths: micro-batches hold different numbers of label tokens, which is what
    # makes a per-micro-batch mean differ from the exact per-step mean
    return Dataset.from_dict({"messages": demo_conversations(n, seed=11)})


def _sft_step(model, tokenizer, tmp_path, batch_size, accumulation):
    config = trl.SFTConfig(output_dir=str(tmp_path / f"b{batch_size}"), max_steps=1,
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                           learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                           max_grad_norm=0.0, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                           max_length=96, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=_conversations(), processing_class=tokenizer)
    return _update(model, trainer.train)


def _update(model, train):
    """The change ``train()`` makes to the trainable parameters."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


def test_gradient_accumulation_equals_the_large_batch(zoo_cache, tmp_path):
    lengths = [len(c[0]["content"]) + len(c[1]["content"]) for c in demo_conversations(8, seed=11)]
    assert len(set(lengths)) > 4  # the micro-batches really differ in label-token counts
    one_batch = _sft_step(*_lora_model(zoo_cache), tmp_path, batch_size=8, accumulation=1)
    accumulated = _sft_step(*_lora_model(zoo_cache), tmp_path, batch_size=2, accumulation=4)
    for name, delta in one_batch.items():
        assert delta.abs().sum() > 0
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-7)


def _evaluate(model, tokenizer, output_dir):
    """``trainer.evaluate()`` with a token-accuracy ``compute_metrics``; also what it was handed."""
    seen = {}

    def compute_metrics(prediction):
        predictions = prediction.predictions if isinstance(prediction.predictions, tuple) else (prediction.predictions,)
        seen["shapes"] = [np.shape(p) for p in predictions]
        logits, labels = predictions[0], prediction.label_ids
        if np.ndim(logits) != 3:  # TRL 1.10's SFT eval hands compute_metrics no logits, whatever the model
            return {}
        predicted = logits[:, :-1].argmax(-1)
        mask = labels[:, 1:] != -100
        return {"token_accuracy": float((predicted == labels[:, 1:])[mask].mean())}

    config = trl.SFTConfig(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2,
                           per_device_eval_batch_size=2, report_to="none", use_cpu=True, bf16=False,
                           max_length=64, save_strategy="no", disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=_conversations(4),
                             eval_dataset=_conversations(4), processing_class=tokenizer,
                             compute_metrics=compute_metrics)
    return trainer.evaluate(), seen


def test_eval_and_compute_metrics_get_real_logits(zoo_cache, tmp_path):
    """Eval through TRL: the loss and what compute_metrics receives are plain TRL + PEFT's (real
    (batch, seq, vocab) logits wherever TRL hands logits over at all)."""
    model, tokenizer = _lora_model(zoo_cache)
    plain, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    plain = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES),
                                                       task_type="CAUSAL_LM"))
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(model))
    metrics, seen = _evaluate(model, tokenizer, tmp_path / "ours")
    expected, expected_seen = _evaluate(plain, tokenizer, tmp_path / "plain")
    assert np.isfinite(metrics["eval_loss"])
    assert abs(metrics["eval_loss"] - expected["eval_loss"]) <= 1e-5 * expected["eval_loss"]
    assert seen["shapes"] == expected_seen["shapes"]
    if len(expected_seen["shapes"][0]) == 3:
        assert seen["shapes"][0][-1] == model.get_base_model().config.vocab_size
        assert metrics["eval_token_accuracy"] == expected["eval_token_accuracy"]


def _trainer_step(model, tokenizer, tmp_path, batch_size, accumulation):
    """transformers' Trainer (not TRL): the loss is our fused linear cross-entropy, which gets
    num_items_in_batch from the Trainer."""
    from transformers import Trainer, TrainingArguments

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in demo_conversations(8, seed=11)]
    encoded = tokenizer(texts, truncation=True, max_length=96)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["input_ids"]})

    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id

        def padded(key, value):
            return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

        input_ids = padded("input_ids", pad)
        return {"input_ids": input_ids, "attention_mask": (padded("labels", -100) != -100).long(),
                "labels": padded("labels", -100)}

    args = TrainingArguments(output_dir=str(tmp_path / f"t{batch_size}"), max_steps=1,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                             seed=0, disable_tqdm=True, remove_unused_columns=False)
    return _update(model, Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate).train)


def test_gradient_accumulation_is_exact_through_our_fused_loss(zoo_cache, tmp_path):
    model, tokenizer = _lora_model(zoo_cache)
    model.train()
    probe = tokenizer(["a b c"], return_tensors="pt")
    assert model(**probe, labels=probe["input_ids"]).logits is None  # the fused loss is what runs
    one_batch = _trainer_step(model, tokenizer, tmp_path, batch_size=8, accumulation=1)
    accumulated = _trainer_step(*_lora_model(zoo_cache), tmp_path, batch_size=2, accumulation=4)
    for name, delta in one_batch.items():
        assert delta.abs().sum() > 0
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-7)


def test_adamw_8bit_trains(zoo_cache, tmp_path):
    """bitsandbytes' 8-bit AdamW (Unsloth's default optim) works here, on CPU too (0.50)."""
    import bitsandbytes as bnb

    model, tokenizer = _lora_model(zoo_cache)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, optim="adamw_8bit",
                           learning_rate=1e-3, report_to="none", use_cpu=True, bf16=False, max_length=64,
                           save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=_conversations(), processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer2State) and optimizer.args.optim_bits == 8
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_packed_batch_keeps_sequences_isolated(zoo_cache):
    """Padding-free packing (TRL's collator: one row, per-sequence position_ids, boundary labels
    masked): attention never crosses a boundary, so the packed loss equals the unpacked one, on
    the patched model (fused loss) as upstream."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = _lora_model(zoo_cache)
    model.train()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in demo_conversations(3, seed=4)]
    sequences = [tokenizer(t)["input_ids"] for t in texts]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": ids} for ids in sequences])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    packed_loss = model(**packed).loss  # training forward: the fused loss, no KV cache
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            single = collator([{"input_ids": ids}])
            n = int((single["labels"][:, 1:] != -100).sum())
            total += model(**single).loss.item() * n
            count += n
        assert count == int((packed["labels"][:, 1:] != -100).sum())
        # With a KV cache, transformers does not look for packed sequences: attention crosses the
        # boundaries and the loss changes, so this comparison can fail.
        leaky = model(**packed, use_cache=True).loss
    assert abs(packed_loss.item() - total / count) <= 1e-5 * packed_loss.item()
    assert abs(leaky.item() - total / count) > 1e-3
