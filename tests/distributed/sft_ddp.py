"""Unsloth's notebook flow through TRL's ``SFTTrainer``, under ``torchrun`` (DDP over gloo,
``use_cpu=True``) or in one plain process: ``from_pretrained`` -> ``get_peft_model`` (offloaded
checkpointing) -> ``SFTTrainer(...).train()`` -> ``save_pretrained_merged`` (on every rank, as a
user's script does; it writes once).

``--per-device N`` with the same ``--steps``: 2 ranks x 2 rows, 2 ranks x 1 row x 2 accumulation
steps (``--accumulation``) and 1 process x 4 rows see the same global batches (the Trainer's
seeded sampler, sharded by accelerate). Rank 0 writes ``losses.json`` (the logged loss per
step), ``fusion.json`` (``launch.record_fusion``) and ``adapter.pt`` (the LoRA weights).
``--no-use-cpu`` leaves ``use_cpu`` unset, which must be refused under a launcher on a machine
without a GPU. ``--zero N`` hands the Trainer a DeepSpeed ZeRO-N config (DeepSpeed's CPU
accelerator, gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import peft
import torch
from launch import leave, record_fusion  # (this script's directory)

TEXTS = [f"Question {i}: what is {i} plus {i + 3}? Answer: {2 * i + 3}. " + "Rivers and kites. " * (i % 4)
         for i in range(16)]


def main() -> None:
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder")
    source.add_argument("--zoo", help="a zoo model's name, built here (the GPU session's NCCL step)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--no-use-cpu", action="store_true")
    parser.add_argument("--zero", type=int, choices=(2, 3), help="DeepSpeed ZeRO stage (through the Trainer)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from unsloth_like import FastLanguageModel

    if args.zoo:
        from unsloth_like.testing.zoo import zoo_model_dir

        args.model = zoo_model_dir(args.zoo)
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, load_in_4bit=False, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                             use_gradient_checkpointing="unsloth")
    config = SFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=args.per_device, max_steps=args.steps,
                       gradient_accumulation_steps=args.accumulation,
                       learning_rate=0.2, lr_scheduler_type="constant", logging_steps=1, seed=0, report_to="none",
                       save_strategy="no", max_length=64, dataset_text_field="text", optim="sgd",
                       use_cpu=None if args.no_use_cpu else True, dataloader_num_workers=0,
                       deepspeed=_deepspeed_config(args.zero))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         args=config)
    fusion = record_fusion(model)
    trainer.train()
    with _whole_parameters(model, args.zero):
        adapter = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        report = {"losses": losses, "processes": trainer.accelerator.num_processes,
                  "distributed_type": trainer.accelerator.distributed_type.value,
                  "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}
        print(json.dumps(report))
        (out / "losses.json").write_text(json.dumps(report))
        (out / "fusion.json").write_text(json.dumps(fusion))
        torch.save(adapter, out / "adapter.pt")
    model.save_pretrained_merged(out / "merged", tokenizer)
    if torch.distributed.is_initialized():
        leave()


def _whole_parameters(model, zero: int | None):
    """ZeRO-3 keeps each rank's partition only: gather the trainable ones (every rank takes part)."""
    if zero != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])


def _deepspeed_config(stage: int | None) -> dict | None:
    """ZeRO ``stage`` with the Trainer's own optimizer (SGD, see test_ddp) and batch settings."""
    if stage is None:
        return None
    return {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto"}


if __name__ == "__main__":
    main()
