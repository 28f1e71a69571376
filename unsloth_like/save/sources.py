"""The tensors a save writes, known by name, shape and dtype before any of them is read.

Every writer here streams: one tensor is produced, written and dropped before the next. The
safetensors writer only needs the tensors in order, but a GGUF file puts every tensor's name,
shape and type in its header, before the data. So sources are lists of ``TensorEntry``: the
metadata up front, and a ``load()`` that produces the tensor when its turn comes.

* ``checkpoint_entries(files)``: a safetensors checkpoint as it is on disk (shapes and dtypes
  from the file headers, data memory-mapped on ``load``);
* ``merged_entries(model, plan)``: what ``save_pretrained_merged`` writes for a PEFT model: the
  base weights (the local 16-bit checkpoint the model came from when there is one, else the
  model's own tensors, NF4 dequantised bit-exactly) with the LoRA merged in, a resized
  vocabulary taken from memory, and an untied ``lm_head`` when training changed a tied pair;
* ``model_entries(model)``: a model without adapters (a full finetune, or a base model) as it is
  in memory, since its weights may have been trained.

Keys are always the checkpoint's own names. transformers 5 renames some families' weights on load
(Qwen2-VL's ``model.layers.*`` becomes ``model.language_model.layers.*``, Gemma 3's
``language_model.model.*`` becomes ``model.language_model.*``) and back on save; ``checkpoint_names``
applies that same reverse renaming (transformers' own ``revert_weight_conversion``) to names taken
from the model in memory, so merged saves and GGUF exports read and write what
``from_pretrained`` and llama.cpp's converters expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .merge import MergePlan, checkpoint_files, merged_tensor

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


@dataclass
class TensorEntry:
    """One output tensor: its checkpoint key, shape and dtype, and how to produce it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def checkpoint_entries(files: list[Path]) -> list[TensorEntry]:
    """The tensors of safetensors ``files``, in file order."""
    from safetensors import safe_open

    entries = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES[piece.get_dtype()]
                entries.append(TensorEntry(key, tuple(piece.get_shape()), dtype, _file_loader(path, key)))
    return entries


def _file_loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)
    return load


# --- a PEFT model, merged ------------------------------------------------------------------------


def merged_entries(model, plan: MergePlan) -> tuple[list[TensorEntry], str]:
    """``(entries, description of where the base weights come from)`` for the merge of ``model``."""
    base = model.get_base_model()
    names = checkpoint_names(base)
    plan = plan.renamed(names)
    source = local_checkpoint(base)
    if source is not None:
        entries, described = checkpoint_entries(checkpoint_files(source)), f"the original weights in {source}"
    else:
        entries, described = _in_memory_entries(base)
    embeddings = _embedding_keys(base, names)
    memory = {key: tensor for key, tensor, _ in _base_entries(base) if key in embeddings.values()}
    merged = [_merged_entry(entry, plan, memory) for entry in entries]
    if plan.untie and not any(entry.key == embeddings["output"] for entry in merged):
        merged.append(_untied_head_entry(model, base, merged, embeddings))
    return merged, described


def checkpoint_names(base) -> Callable[[str], str]:
    """Runtime parameter name -> the name the model's checkpoint format gives it (see the module
    docstring); identity for families transformers does not rename."""
    from functools import cache

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions saves runtime names
        return lambda key: key

    @cache
    def name(key: str) -> str:
        reverted = revert_weight_conversion(base, {key: torch.empty(0)})
        return next(iter(reverted)) if len(reverted) == 1 else key

    return name


def _embedding_keys(base, names: Callable[[str], str]) -> dict[str, str | None]:
    """Checkpoint keys of the input and output embedding weights."""
    keys = {}
    for role, module in (("input", base.get_input_embeddings()), ("output", base.get_output_embeddings())):
        path = next((n for n, m in base.named_modules() if m is module), None)
        keys[role] = names(f"{path}.weight") if path is not None else None
    return keys


def _merged_entry(entry: TensorEntry, plan: MergePlan, memory: dict) -> TensorEntry:
    in_memory = memory.get(entry.key)
    if in_memory is not None and tuple(in_memory.shape) != entry.shape:  # a resized vocabulary
        def base_tensor() -> torch.Tensor:
            return in_memory.detach().to(entry.dtype).cpu()
        shape = tuple(in_memory.shape)
    else:
        base_tensor, shape = entry.load, entry.shape
    return TensorEntry(entry.key, shape, entry.dtype, lambda: merged_tensor(entry.key, base_tensor(), plan))


def _untied_head_entry(model, base, entries: list[TensorEntry], embeddings: dict) -> TensorEntry:
    """Tied in the checkpoint, different now: the trained lm_head is written on its own."""
    head = _effective_weight(base.get_output_embeddings(), model.active_adapter)
    embed = next((e for e in entries if e.key == embeddings["input"]), None)
    dtype = embed.dtype if embed is not None else head.dtype
    return TensorEntry(embeddings["output"], tuple(head.shape), dtype, lambda: head.detach().cpu().to(dtype))


def _effective_weight(module, adapter: str):
    """The weight a (possibly ``modules_to_save``-wrapped) module computes with."""
    if type(module).__name__ == "ModulesToSaveWrapper":
        module = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module
    return module.weight


def local_checkpoint(base) -> Path | None:
    """The local, unquantised safetensors checkpoint the base model was loaded from, if any."""
    name = getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    directory = Path(name)
    config_file = directory / "config.json"
    if not config_file.is_file() or '"quantization_config"' in config_file.read_text():
        return None
    return directory if checkpoint_files(directory) else None


def _in_memory_entries(base) -> tuple[list[TensorEntry], str]:
    if getattr(base, "is_loaded_in_8bit", False):
        raise ValueError("This model was loaded in 8-bit and its 16-bit checkpoint is not available locally "
                         f"(config name_or_path {base.config._name_or_path!r}); merging onto int8 weights is not "
                         "supported. Save with save_method='lora', or load the base from a local 16-bit checkpoint.")
    described = "the model's weights in memory"
    if getattr(base, "is_loaded_in_4bit", False):
        described = ("dequantised NF4 weights: the 16-bit checkpoint the model was loaded from is not available "
                     f"locally ({base.config._name_or_path!r}), so the merge starts from the 4-bit rounding")
    return [_memory_entry(key, tensor, nf4) for key, tensor, nf4 in _base_entries(base)], described


def model_entries(model) -> tuple[list[TensorEntry], str]:
    """``(entries, description)`` of a ``PreTrainedModel`` without adapters, from memory (a
    4-bit model's weights dequantised: they carry the 4-bit rounding, and the description says so)."""
    if getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("This model is loaded in 8-bit; exporting int8 weights is not supported. Load it in "
                         "16-bit, or convert its checkpoint directory with unsloth_like.save.gguf.convert.")
    described = "the model's weights in memory"
    if getattr(model, "is_loaded_in_4bit", False):
        described += " (dequantised NF4: they carry the 4-bit rounding; convert the 16-bit checkpoint for better)"
    return [_memory_entry(key, tensor, nf4) for key, tensor, nf4 in _base_entries(model)], described


def _memory_entry(key: str, tensor: torch.Tensor, nf4_module) -> TensorEntry:
    """A base tensor in memory: a reference, or an NF4 weight dequantised (bit-exactly) on load."""
    if nf4_module is None:
        return TensorEntry(key, tuple(tensor.shape), tensor.dtype, lambda: tensor)
    from ..kernels.quant import dequantize_nf4

    state = nf4_module.weight.quant_state
    return TensorEntry(key, tuple(state.shape), state.dtype,
                       lambda: dequantize_nf4(nf4_module.weight.data, nf4_module.weight.quant_state))


def _base_entries(base):
    """``(checkpoint key, state_dict tensor, NF4 module or None)`` of the base weights (of the
    model inside a PEFT wrapper), under the checkpoint's names: adapter tensors,
    ``modules_to_save`` copies, 4-bit quantisation-state entries and the second name of a tied
    tensor left out."""
    nf4 = _nf4_modules(base)
    names = checkpoint_names(base)
    seen = set()  # tied weights (lm_head = embed_tokens) are one tensor, saved once as checkpoints do
    for key, tensor in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key or _is_quant_state_key(key, nf4):
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and storage in seen:
            continue
        seen.add(storage)
        yield names(key.replace(".base_layer.", ".").replace(".original_module.", ".")), tensor, nf4.get(key)


def _nf4_modules(base) -> dict:
    """``{state_dict key of the packed weight: module}`` for bitsandbytes 4-bit layers."""
    return {f"{name}.weight": module for name, module in base.named_modules()
            if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")}


def _is_quant_state_key(key: str, nf4: dict) -> bool:
    """bitsandbytes stores a 4-bit weight's quantisation state as extra ``<weight>.*`` entries."""
    marker = key.find(".weight.")
    return marker >= 0 and key[:marker + len(".weight")] in nf4
