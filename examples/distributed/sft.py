"""LoRA / QLoRA finetuning with Unsloth's notebook flow, on one GPU or many: the same script.

    python sft.py --model unsloth/Llama-3.2-1B-Instruct --dataset data.jsonl           # one GPU
    torchrun --nproc_per_node 4 sft.py --model ... --dataset ...                        # DDP, 4 GPUs
    accelerate launch --config_file accelerate/fsdp2.yaml sft.py --model ... --dataset ...   # FSDP2
    accelerate launch --config_file accelerate/zero3.yaml sft.py --model ... --dataset ...   # ZeRO-3

Several machines: run the same line on each, with torchrun's ``--nnodes/--node_rank/--rdzv_*`` or
accelerate's ``--num_machines/--machine_rank/--main_process_ip``. On a machine without a GPU the
processes train together over gloo (``use_cpu``). The dataset is a json/jsonl file (or a folder
saved by ``datasets``, or a hub id) whose rows have ``text`` or ``messages`` (a chat, rendered with
the model's chat template). Writes ``<output>/lora`` (the adapter) and ``<output>/merged`` (16-bit
weights), once, from rank 0, whatever the number of processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a hub id or a local model folder")
    parser.add_argument("--dataset", required=True, help="a json/jsonl file, a saved datasets folder or a hub id")
    parser.add_argument("--output", default="outputs/sft")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA (NF4 base weights)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per process and step")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args()

    import torch
    from trl import SFTConfig, SFTTrainer

    from unsloth_like import FastLanguageModel
    from unsloth_like.data_files import load_training_dataset

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.max_seq_length,
                                                         load_in_4bit=args.load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=args.r, lora_alpha=args.r, random_state=3407,
                                             use_gradient_checkpointing="unsloth")
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=load_training_dataset(args.dataset),
        args=SFTConfig(output_dir=str(Path(args.output) / "run"), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=args.accumulation, max_steps=args.max_steps,
                       learning_rate=args.learning_rate, warmup_steps=min(5, args.max_steps // 10),
                       lr_scheduler_type="linear", logging_steps=1, seed=3407, max_length=args.max_seq_length,
                       report_to="none", save_strategy="no",
                       use_cpu=not torch.cuda.is_available()),  # without a GPU: processes join over gloo
    )
    trainer.train()
    trainer.save_model(str(Path(args.output) / "lora"))  # the Trainer gathers FSDP/ZeRO-3 state, rank 0 writes
    model.save_pretrained_merged(str(Path(args.output) / "merged"), tokenizer, save_method="merged_16bit")
    if trainer.is_world_process_zero():
        print(f"Trained {trainer.state.global_step} steps on {trainer.accelerator.num_processes} process(es) "
              f"({trainer.accelerator.distributed_type.value}); wrote {args.output}/lora and {args.output}/merged.")
    if torch.distributed.is_initialized():  # shut the process group down together, before the interpreter does
        torch.distributed.barrier()  # (torch 2.9 with gloo can hang when one rank destroys it before the other)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
