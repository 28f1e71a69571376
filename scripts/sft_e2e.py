"""End-to-end SFT the way Unsloth's notebooks write it, on a built-in instruction dataset.

    python scripts/sft_e2e.py                      # 100 steps, zoo Llama, writes benchmarks/sft-e2e-<device>.json
    python scripts/sft_e2e.py --steps 30 --model qwen2 --out /tmp/curve.json

The notebook path, line for line: ``FastLanguageModel.from_pretrained`` → ``get_chat_template`` →
``get_peft_model`` → ShareGPT data through ``standardize_sharegpt`` / ``apply_chat_template`` →
TRL's ``SFTTrainer`` called with the legacy keywords (``tokenizer=``, ``dataset_text_field=``,
``max_seq_length=``, ``TrainingArguments``) → ``train_on_responses_only`` → ``train()``. The data
are question/answer pairs with learnable rules (sums, list reversal, recall;
``unsloth_like.testing.corpus``), so the loss on the replies falls clearly. The curve is written
as JSON (atomically).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

TEMPLATES = {"llama": "llama-3.1", "qwen2": "chatml", "qwen3": "qwen-3", "mistral": "mistral"}


def run(model_name: str = "llama", steps: int = 100, cache_dir=None, output_dir: str = "outputs/sft-e2e") -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import SFTTrainer

    from unsloth_like import (FastLanguageModel, apply_chat_template, get_chat_template, standardize_sharegpt,
                              train_on_responses_only)
    from unsloth_like.testing.corpus import demo_conversations
    from unsloth_like.testing.zoo import zoo_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir(model_name, cache_dir)),
                                                         max_seq_length=256, load_in_4bit=False)
    tokenizer = get_chat_template(tokenizer, TEMPLATES[model_name])
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, random_state=3407,
                                             use_gradient_checkpointing="unsloth")
    sharegpt = [[{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in chat]
                for chat in demo_conversations(800, seed=17)]
    dataset = standardize_sharegpt(Dataset.from_dict({"conversations": sharegpt}))
    dataset = apply_chat_template(dataset, tokenizer=tokenizer)
    cuda = torch.cuda.is_available()
    trainer = SFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text", max_seq_length=256,
        packing=False, dataset_num_proc=1,
        args=TrainingArguments(output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                               warmup_steps=5, max_steps=steps, learning_rate=2e-3, lr_scheduler_type="linear",
                               optim="adamw_8bit", weight_decay=0.01, logging_steps=1, seed=3407,
                               report_to="none", save_strategy="no", use_cpu=not cuda, bf16=False,
                               disable_tqdm=True))
    trainer = train_on_responses_only(trainer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"model": model_name, "template": TEMPLATES[model_name], "steps": steps, "seconds": seconds,
            "device": torch.cuda.get_device_name() if cuda else "CPU", "date": datetime.date.today().isoformat(),
            "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TEMPLATES), default="llama")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.model, args.steps)
    losses = result["losses"]
    print(f"{result['steps']} steps in {result['seconds']:.0f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"(mean of first 10 {sum(losses[:10]) / 10:.3f}, last 10 {sum(losses[-10:]) / 10:.3f})")
    slug = "cpu" if result["device"] == "CPU" else result["device"].split()[-1].lower()
    out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / f"sft-e2e-{slug}.json")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
