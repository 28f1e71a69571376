"""``unsloth-like train``: Unsloth's notebook flow as one command, from flags or a YAML/JSON config.

``FastLanguageModel.from_pretrained`` -> ``get_chat_template`` (optional) ->
``FastLanguageModel.get_peft_model`` -> TRL's ``SFTTrainer`` (optionally
``train_on_responses_only``) -> the adapter and tokenizer in ``<output_dir>/lora``. Checkpoints go
to ``<output_dir>/checkpoints`` every ``save_steps``; ``resume: true`` continues from the newest one
(optimizer, scheduler, data order and RNG included, as the Trainer restores them). ``export``
then saves the trained model as ``merged_16bit`` / ``merged_4bit`` (``<output_dir>/merged_16bit``, ...)
and/or ``gguf`` (``<output_dir>/gguf``: one file per ``quantization`` method and an Ollama
Modelfile), as ``unsloth-like export`` would from the adapter.

Every setting is a field of ``TrainSettings``; a config file sets any of them, and flags given on
the command line win over the file. Unknown keys and bad values are refused in one sentence before
anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainSettings:
    model: str = ""  # a model directory or hub id (required)
    dataset: str = ""  # a json/jsonl/parquet file, a saved datasets folder or a hub id (required)
    output_dir: str = "outputs/train"
    chat_template: str | None = None  # a name from chat_templates.CHAT_TEMPLATES
    train_on_responses_only: bool = False  # mask the user turns out of the loss (needs chat_template)
    load_in_4bit: bool = True  # QLoRA, Unsloth's default; false: 16-bit LoRA
    max_seq_length: int = 2048
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every attention and MLP projection
    use_gradient_checkpointing: str | bool = "unsloth"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_steps: int = 60  # -1: use num_train_epochs
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.01
    optim: str = "adamw_8bit"
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    packing: bool = False
    resume: bool = False
    export: list[str] | None = None  # after training: any of merged_16bit, merged_4bit, gguf
    quantization: list[str] | None = None  # GGUF methods for export gguf (default q8_0)


FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings)}
LIST_FIELDS = ("target_modules", "export", "quantization")
EXPORT_FORMATS = ("merged_16bit", "merged_4bit", "gguf")


def read_config(path: str | Path) -> dict:
    """The settings a YAML or JSON file gives (a mapping of TrainSettings fields)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # PyYAML: a dependency of accelerate, so always installed with us

        values = yaml.safe_load(text)
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"Config file {path} must be .yaml, .yml or .json.")
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of settings, not {type(values).__name__}.")
    return values


def make_settings(config: dict, overrides: dict) -> TrainSettings:
    """Config values, then the flags given (``overrides``, None meaning not given), checked."""
    values = {**config, **{k: v for k, v in overrides.items() if v is not None}}
    for name in ("export", "quantization"):  # `export: gguf` in a config file means [gguf]
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; the settings are: {', '.join(FIELDS)}.")
    defaults = TrainSettings()
    for name, value in values.items():
        _check_type(name, value, getattr(defaults, name))
    settings = TrainSettings(**values)
    check_settings(settings)
    return settings


def _check_type(name: str, value, default) -> None:
    """Numbers and switches must be what their defaults are (a config file can hold anything)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) and name != "use_gradient_checkpointing":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return
    if not ok:
        raise ValueError(f"{name} must be of type {type(default).__name__}, got {value!r}.")


def check_settings(settings: TrainSettings) -> None:
    from .chat_templates import lookup_chat_template
    from .data_files import check_dataset_source

    if not settings.model or not settings.dataset:
        raise ValueError("Both model and dataset are required (--model, --dataset, or in the config file).")
    check_dataset_source(settings.dataset)
    if settings.chat_template is not None:
        lookup_chat_template(settings.chat_template)  # an unknown name is refused here, before loading
    if settings.train_on_responses_only and settings.chat_template is None:
        raise ValueError("train_on_responses_only needs chat_template (it finds the turns by the template's markers).")
    if settings.max_steps == 0 or settings.max_steps < -1:
        raise ValueError(f"max_steps must be positive, or -1 to train num_train_epochs; got {settings.max_steps}.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "r", "max_seq_length", "save_steps"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}.")
    checkpoints = Path(settings.output_dir) / "checkpoints"
    if settings.resume and not any(checkpoints.glob("checkpoint-*")):
        raise ValueError(f"resume is set but {checkpoints} holds no checkpoint; run without resume first.")
    _check_export(settings)


def _check_export(settings: TrainSettings) -> None:
    """Export settings are checked with the rest, so that a typo does not cost a training run."""
    for name in ("export", "quantization"):
        value = getattr(settings, name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{name} must be a list of names, got {value!r}.")
    unknown = [name for name in settings.export or [] if name not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"Unknown export format {unknown[0]!r}; export takes any of {', '.join(EXPORT_FORMATS)}.")
    if settings.quantization is not None:
        if "gguf" not in (settings.export or []):
            raise ValueError("quantization names GGUF methods, so export must include gguf.")
        from .save.gguf.methods import resolve_methods

        resolve_methods(settings.quantization)  # an unknown method is refused with the closest name


def run_training(settings: TrainSettings, log=print):
    """Train as the module docstring says; returns the Trainer (its state has the log history)."""
    check_settings(settings)
    import torch
    from trl import SFTConfig, SFTTrainer

    from .data_files import load_training_dataset
    from .models.loader import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(settings.model, max_seq_length=settings.max_seq_length,
                                                         load_in_4bit=settings.load_in_4bit)
    if settings.chat_template is not None:
        from .chat_templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=settings.chat_template)
    lora = {} if settings.target_modules is None else {"target_modules": settings.target_modules}
    model = FastLanguageModel.get_peft_model(model, r=settings.r, lora_alpha=settings.lora_alpha,
                                             lora_dropout=settings.lora_dropout, random_state=settings.seed,
                                             use_gradient_checkpointing=settings.use_gradient_checkpointing, **lora)
    out = Path(settings.output_dir)
    config = SFTConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, max_steps=settings.max_steps,
        num_train_epochs=settings.num_train_epochs, learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps, lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay, optim=settings.optim, seed=settings.seed,
        logging_steps=settings.logging_steps, save_strategy="steps", save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit, max_length=settings.max_seq_length, packing=settings.packing,
        report_to="none", use_cpu=not torch.cuda.is_available(),  # precision: the hand-off's hardware default
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config,
                         train_dataset=load_training_dataset(settings.dataset))
    if settings.train_on_responses_only:
        from .responses_only import train_on_responses_only

        trainer = train_on_responses_only(trainer)
    trainer.train(resume_from_checkpoint=True if settings.resume else None)
    trainer.save_model(str(out / "lora"))
    tokenizer.save_pretrained(str(out / "lora"))
    (out / "train_settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log(f"train: {trainer.state.global_step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter in {out / 'lora'}"
        if losses else f"train: {trainer.state.global_step} steps; adapter in {out / 'lora'}")
    for path in export_trained(model, tokenizer, settings):
        log(f"train: exported {path}")
    if not settings.export:
        log(f"train: export it with unsloth-like export {out / 'lora'} <dir> --to merged_16bit|gguf, or --export")
    return trainer


def export_trained(model, tokenizer, settings: TrainSettings) -> list[Path]:
    """Each ``export`` format of the trained model into ``<output_dir>/<format>``; the written paths.
    A rerun (e.g. after ``resume``) replaces the previous export."""
    out = Path(settings.output_dir)
    written: list[Path] = []
    for name in settings.export or []:
        if name == "gguf":
            written += model.save_pretrained_gguf(str(out / "gguf"), tokenizer, overwrite=True,
                                                  quantization_method=settings.quantization or ["q8_0"])
        else:
            written.append(Path(model.save_pretrained_merged(str(out / name), tokenizer, save_method=name,
                                                             overwrite=True)))
    return written
