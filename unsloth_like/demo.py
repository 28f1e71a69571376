"""The built-in end-to-end job: load a tiny zoo model with ``FastLanguageModel``, add LoRA with
``FastLanguageModel.get_peft_model`` (fused LoRA path, offloaded checkpointing on GPU), finetune
it through TRL's ``SFTTrainer``, and save the adapter.

Runs anywhere (CPU in a few seconds, GPU if present) with nothing downloaded. It is what
``make demo`` / ``python -m unsloth_like demo`` runs, and it grows with the library: later stages
add merged and GGUF exports.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .env import is_bfloat16_supported
from .testing.corpus import demo_conversations
from .models.loader import FastLanguageModel
from .testing.zoo import get_spec, zoo_model_dir


_MAX_LENGTH = 128


@dataclass
class DemoSettings:
    output_dir: Path = Path("outputs/demo")
    architecture: str = "llama"
    max_steps: int = 40
    seed: int = 3407
    overwrite: bool = False
    n_conversations: int = 256
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_rank: int = 16
    cache_dir: Path | None = None  # zoo cache; None = ~/.cache/unsloth_like/zoo


@dataclass
class DemoResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def _check_settings(settings: DemoSettings) -> None:
    spec = get_spec(settings.architecture)
    if spec.is_vlm:
        raise ValueError(f"The demo trains text models; {spec.name!r} is a vision-language model.")
    if settings.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {settings.max_steps}.")
    out = Path(settings.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output path {out} exists and is not a directory; choose another --output-dir.")
    if out.is_dir() and any(out.iterdir()) and not settings.overwrite:
        raise ValueError(f"Output directory {out} is not empty; pass --overwrite to replace it.")


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out`` by renames only, so a killed run never
    leaves a directory that looks finished, and an old ``out`` is removed only once the new one
    is in place."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}-previous-{staging.name}")
        out.rename(previous)
    staging.rename(out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def run_demo(settings: DemoSettings | None = None, *, log=print) -> DemoResult:
    """Train, save the adapter + tokenizer to ``settings.output_dir``, and report the loss."""
    settings = settings or DemoSettings()
    _check_settings(settings)  # fail before anything is built or trained

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(zoo_model_dir(settings.architecture, settings.cache_dir)), max_seq_length=_MAX_LENGTH,
        load_in_4bit=False,  # bitsandbytes' CPU 4-bit path is slow; a GPU run could use QLoRA
    )
    model = FastLanguageModel.get_peft_model(
        model, r=settings.lora_rank, lora_alpha=settings.lora_rank, lora_dropout=0.0,
        target_modules="all-linear", random_state=settings.seed, use_gradient_checkpointing="unsloth",
    )
    dataset = Dataset.from_dict({"messages": demo_conversations(settings.n_conversations, seed=settings.seed)})

    out = Path(settings.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        config = SFTConfig(
            output_dir=str(staging / "trainer"),
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=settings.seed,
            max_length=_MAX_LENGTH,
            bf16=is_bfloat16_supported(),
            fp16=False,
            use_cpu=device == "cpu",
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"Training produced no finite losses: {losses}.")

        shutil.rmtree(staging / "trainer", ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        result = DemoResult(output_dir=out, losses=losses, seconds=seconds, device=device)
        summary = {"settings": {k: str(v) for k, v in asdict(settings).items()},
                   "device": device, "seconds": seconds, "losses": losses}
        (staging / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    log(
        f"demo: trained zoo '{settings.architecture}' with LoRA r={settings.lora_rank} for "
        f"{settings.max_steps} steps on {device} in {result.seconds:.1f}s; "
        f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}; adapter saved to {out}"
    )
    return result
