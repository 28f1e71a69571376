"""A small SFT run for tests/test_resume.py, in its own process so it can be killed mid-run.

    python tests/resume_job.py OUTPUT_DIR ZOO_CACHE [--kill-after-step N] [--resume]

Trains the zoo Qwen2 with LoRA (get_peft_model) for 6 steps, checkpointing every 2 steps, and
writes the final adapter to OUTPUT_DIR/final. ``--kill-after-step N`` SIGKILLs the process right
after checkpoint N is saved (an interrupted run); ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("zoo_cache")
    parser.add_argument("--kill-after-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from unsloth_like import FastLanguageModel
    from unsloth_like.testing.corpus import demo_conversations
    from unsloth_like.testing.zoo import zoo_model_dir

    class KillAfterSave(TrainerCallback):
        def on_save(self, arguments, state, control, **kwargs):
            if state.global_step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", args.zoo_cache)),
                                                         load_in_4bit=False, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0, use_gradient_checkpointing="unsloth")
    config = SFTConfig(output_dir=args.output_dir, max_steps=6, save_steps=2, save_strategy="steps",
                       per_device_train_batch_size=2, learning_rate=5e-3, lr_scheduler_type="linear",
                       logging_steps=1, report_to="none", use_cpu=True, bf16=False, max_length=64, seed=0,
                       disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": demo_conversations(16, seed=9)}),
                         callbacks=[KillAfterSave()] if args.kill_after_step else None)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    model.save_pretrained(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
