"""``model.save_pretrained_merged(save_directory, tokenizer, save_method=...)`` (Unsloth's name).

``save_method``:

* ``"lora"``: the adapter directory PEFT writes (plus the tokenizer), loadable by plain PEFT;
* ``"merged_16bit"``: the base model with the adapter merged in (``merge.py``), as a standard
  transformers checkpoint in the base's own dtype and key names, loadable by
  ``AutoModelForCausalLM`` (``AutoModelForImageTextToText`` for a vision-language model, saved
  with its processor's files, the standalone image/video preprocessor configs included);
* ``"merged_4bit"`` (alias ``"merged_4bit_forced"``, Unsloth's name): that merged checkpoint
  quantised to bitsandbytes NF4 (double quantisation, the base's compute dtype) and saved as a
  pre-quantised transformers checkpoint. Rounding the merged weights to 4 bits loses precision
  (a warning says so): for further training or exact inference keep ``merged_16bit``.

Everything is checked before any work: the method, ``max_shard_size``, a target directory that
exists and is not empty (refused unless ``overwrite=True``), a parent that is writable, free disk
space for the expected output. Writes are atomic: everything goes to a temporary directory next
to the target, renamed into place at the end, so a killed save never leaves a directory that
looks complete. A tqdm bar counts tensors.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..chat_templates import stop_on_tokenizer_eos
from ..models.vision import PROCESSOR_FILES, is_vision_config, keep_unquantized_modules
from .distributed import once_on_rank0
from .merge import ShardWriter, plan_merge
from .sources import merged_entries
from .staging import remove_abandoned, staging_name

logger = logging.getLogger(__name__)

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit", "merged_4bit_forced")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def attach_save_methods(peft_model):
    """Bind ``save_pretrained_merged`` / ``push_to_hub_merged`` / ``save_pretrained_gguf`` /
    ``push_to_hub_gguf`` to this model object (per instance, like our patching); in a distributed
    run each is collective and writes once, from rank 0 (``save.distributed``)."""
    import types

    from .gguf import save_pretrained_gguf
    from .hub import push_to_hub_gguf, push_to_hub_merged

    for function in (save_pretrained_merged, push_to_hub_merged, save_pretrained_gguf, push_to_hub_gguf):
        setattr(peft_model, function.__name__, types.MethodType(once_on_rank0(function), peft_model))
    return peft_model


def attach_export_methods(model):
    """Bind ``save_pretrained_gguf`` / ``push_to_hub_gguf`` to a model without adapters (a full
    finetune or a base model: exported as it is in memory)."""
    import types

    from .gguf import save_pretrained_gguf
    from .hub import push_to_hub_gguf

    for function in (save_pretrained_gguf, push_to_hub_gguf):
        setattr(model, function.__name__, types.MethodType(once_on_rank0(function), model))
    return model


def save_pretrained_merged(model, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                           max_shard_size="5GB", safe_serialization: bool = True, overwrite: bool = False,
                           **kwargs):
    """Save ``model`` (a PEFT model from ``get_peft_model``) as ``save_method`` (see the module
    docstring) into ``save_directory``; returns the directory as a ``Path``."""
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {SAVE_METHODS}, got {save_method!r}.")
    if not safe_serialization:
        raise ValueError("Only safetensors output is written; drop safe_serialization=False.")
    if kwargs:
        raise TypeError(f"save_pretrained_merged got unexpected arguments {sorted(kwargs)}.")
    max_bytes = parse_size(max_shard_size)
    target = Path(save_directory).expanduser()
    _check_target(target, overwrite)
    if save_method == "lora":
        with atomic_directory(target, overwrite) as staging:
            model.save_pretrained(staging)
            _save_tokenizer(tokenizer, staging)
        return target
    plan = plan_merge(model)  # refuses unsupported adapters before anything is written
    if save_method != "merged_16bit":
        logger.warning("save_method=%r rounds the merged weights to 4 bits (NF4): the saved model is less precise "
                       "than the LoRA model. Keep save_method='merged_16bit' for exact results.", save_method)
    base = model.get_base_model()
    entries, described = merged_entries(model, plan)
    expected_bytes = sum(entry.nbytes for entry in entries)
    # merged_4bit holds the 16-bit merge and its 4-bit copy at once, until the former is deleted
    _check_disk_space(target, expected_bytes * (1 if save_method == "merged_16bit" else 1.3))
    logger.info("save_pretrained_merged: merging onto %s.", described)
    with atomic_directory(target, overwrite) as staging:
        merged_dir = staging / ".merged-16bit" if save_method != "merged_16bit" else staging
        merged_dir.mkdir(exist_ok=True)
        written = _write_merged(entries, merged_dir, max_bytes)
        _save_config(base, merged_dir, untie=plan.untie, dtype=written, tokenizer=tokenizer)
        if merged_dir is not staging:
            _quantize_4bit(merged_dir, staging, base, max_shard_size)
            shutil.rmtree(merged_dir)
        _save_tokenizer(tokenizer, staging, getattr(base.config, "_name_or_path", None))
        _write_model_card(staging, base, save_method)
    return target


def _write_model_card(staging: Path, base, save_method: str) -> None:
    name = getattr(base.config, "_name_or_path", "") or "unknown"
    base_line = f"base_model: {name}\n" if "/" in name and not Path(name).exists() else ""
    auto = "AutoModelForImageTextToText" if is_vision_config(base.config) else "AutoModelForCausalLM"
    (staging / "README.md").write_text(
        f"---\n{base_line}library_name: transformers\ntags:\n- unsloth_like\n- lora\n- {save_method}\n---\n\n"
        f"# {Path(name).name or 'model'} with its LoRA adapter merged\n\n"
        f"Saved by unsloth_like with `save_method=\"{save_method}\"`: the LoRA update `W + s·B·A` was merged "
        f"in fp32 and cast once to each weight's dtype. Load it with `transformers.{auto}.from_pretrained`."
        + (" The weights are bitsandbytes NF4 (4-bit)." if save_method.startswith("merged_4bit") else "") + "\n")


def _quantize_4bit(merged_dir: Path, staging: Path, base, max_shard_size) -> None:
    """Load the merged 16-bit checkpoint in NF4 and save it pre-quantised."""
    import transformers

    compute_dtype = getattr(getattr(base.config, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    vision = is_vision_config(base.config)
    keep = keep_unquantized_modules(base.config) if vision else ["lm_head"]
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or base.dtype,
        llm_int8_skip_modules=keep)
    device = base.device if base.device.type == "cuda" else "cpu"
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    quantized = auto.from_pretrained(merged_dir, quantization_config=quantization, device_map={"": device})
    quantized.save_pretrained(staging, max_shard_size=max_shard_size)
    del quantized


# --- the merged weights ---------------------------------------------------------------------------


def _write_merged(entries, staging: Path, max_bytes: int):
    """Writes the merged shards; returns the widest floating dtype written (the config's dtype)."""
    from tqdm.auto import tqdm

    writer = ShardWriter(staging, max_bytes)
    for entry in tqdm(entries, desc="Merging LoRA", unit="tensor"):
        writer.add(entry.key, entry.load())
    writer.finish()
    floating = [entry.dtype for entry in entries if entry.dtype.is_floating_point]
    return max(floating, key=lambda d: d.itemsize) if floating else None


# --- config, tokenizer ----------------------------------------------------------------------------


def _save_config(base, staging: Path, untie: bool, dtype, tokenizer=None) -> None:
    config = copy.deepcopy(base.config)
    for attribute in ("quantization_config", "unsloth_return_logits"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    if untie:
        config.get_text_config().tie_word_embeddings = False
        config.tie_word_embeddings = False
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(staging)
    if getattr(base, "generation_config", None) is not None:
        generation_config = copy.deepcopy(base.generation_config)
        if tokenizer is not None:  # generation with the saved model stops where chats end
            stop_on_tokenizer_eos(generation_config, tokenizer)
        generation_config.save_pretrained(staging)


def _save_tokenizer(tokenizer, staging: Path, source: str | None = None) -> None:
    if tokenizer is None:
        logger.warning("save_pretrained_merged: no tokenizer given, so none is saved with the model; pass "
                       "tokenizer=... to get a directory you can load and chat with.")
        return
    tokenizer.save_pretrained(staging)
    if getattr(tokenizer, "image_processor", None) is not None:
        save_processor_files(tokenizer, staging, source)


def save_processor_files(processor, staging: Path, source: str | None) -> None:
    """Next to ``processor.save_pretrained``'s files (transformers 5 nests the image and video
    processors inside ``processor_config.json``): the standalone preprocessor configs, and any
    processor file of a local source checkpoint that is still missing (never replacing what the
    processor, which the user may have changed, just wrote)."""
    for part in ("image_processor", "video_processor"):
        component = getattr(processor, part, None)
        if component is not None:
            component.save_pretrained(staging)
    source_dir = Path(source) if source and Path(source).is_dir() else None
    if source_dir is None:
        return
    for name in PROCESSOR_FILES:
        if (source_dir / name).is_file() and not (staging / name).exists():
            shutil.copy2(source_dir / name, staging / name)


# --- checks and atomic writes ---------------------------------------------------------------------


def parse_size(size) -> int:
    """``5GB`` / ``500MB`` / ``"2GiB"`` / an int of bytes -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive size such as '5GB', '500MB' or a number of bytes, "
                         f"got {size!r}.")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file; choose a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose a new directory or pass overwrite=True.")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write into {parent}; choose a directory you can write to.")


def _check_disk_space(target: Path, expected_bytes: float) -> None:
    free = shutil.disk_usage(target.parent).free
    needed = int(expected_bytes * 1.05) + (64 << 20)  # the shards, configs and tokenizer, with margin
    if free < needed:
        raise OSError(f"Not enough disk space in {target.parent}: the merged model needs about "
                      f"{needed / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free.")


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool):
    """A temporary directory next to ``target``, renamed to ``target`` when the block succeeds.

    Its name records the host and process (``staging``): a later save to the same target removes
    what a killed one left, and nothing of a save still running.
    """
    remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_name(target, "-"), dir=target.parent))
    try:
        yield staging
        if target.exists():
            if not overwrite and any(target.iterdir()):
                raise FileExistsError(f"{target} appeared while saving; nothing was replaced.")
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

