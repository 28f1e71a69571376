"""Unsloth's notebook flow through TRL's ``SFTTrainer``, under ``torchrun`` (DDP over gloo,
``use_cpu=True``) or in one plain process: ``from_pretrained`` -> ``get_peft_model`` (offloaded
checkpointing) -> ``SFTTrainer(...).train()`` -> ``save_pretrained_merged`` (on every rank, as a
user's script does; it writes once).

``--per-device N`` with the same ``--steps``: 2 ranks x 2 rows, 2 ranks x 1 row x 2 accumulation
steps (``--accumulation``) and 1 process x 4 rows see the same global batches (the Trainer's
seeded sampler, sharded by accelerate). Rank 0 writes ``losses.json``
(the logged loss per step) and ``adapter.pt`` (the LoRA weights). ``--no-use-cpu`` leaves
``use_cpu`` unset, which must be refused under a launcher on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TEXTS = [f"Question {i}: what is {i} plus {i + 3}? Answer: {2 * i + 3}. " + "Rivers and kites. " * (i % 4)
         for i in range(16)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--no-use-cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from unsloth_like import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, load_in_4bit=False, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                             use_gradient_checkpointing="unsloth")
    config = SFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=args.per_device, max_steps=args.steps,
                       gradient_accumulation_steps=args.accumulation,
                       learning_rate=0.2, lr_scheduler_type="constant", logging_steps=1, seed=0, report_to="none",
                       save_strategy="no", max_length=64, dataset_text_field="text", optim="sgd",
                       use_cpu=None if args.no_use_cpu else True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         args=config)
    trainer.train()
    if trainer.is_world_process_zero():
        import peft

        out.mkdir(parents=True, exist_ok=True)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (out / "losses.json").write_text(json.dumps({"losses": losses,
                                                     "processes": trainer.accelerator.num_processes}))
        torch.save(peft.get_peft_model_state_dict(model), out / "adapter.pt")
    model.save_pretrained_merged(out / "merged", tokenizer)
    if torch.distributed.is_initialized():
        from launch import leave  # (this script's directory)

        leave()


if __name__ == "__main__":
    main()
