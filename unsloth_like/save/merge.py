"""LoRA merged into base weights, streamed tensor by tensor from the base checkpoint.

``W' = W + s·B·A`` is formed in fp32 and cast once to the tensor's own dtype. The base weights
are read from the checkpoint the model was loaded from when it is a local safetensors checkpoint
(also when the model was loaded in 4-bit from it: the merge then lands on the original 16-bit
weights, not on dequantised NF4), one tensor at a time, and written to output shards of at most
``max_shard_size`` bytes: peak memory is about one shard plus one tensor, not the model twice.
Without such a checkpoint (a 16-bit model built or changed in memory) the model's own tensors are
streamed the same way.

What replaces or changes a base tensor:

* LoRA layers of the active adapter (rsLoRA or any scaling: the layer's own ``scaling``);
* ``modules_to_save`` copies (trained embeddings / lm_head), which replace the tensor whole;
* tensors whose in-memory shape differs from the checkpoint's (a resized vocabulary);
* tied embeddings whose lm_head or embedding changed: both are written and the tie is dropped.

DoRA layers merge as PEFT merges them: ``W' = m / ‖W + s·B·A‖_row · (W + s·B·A)`` with the
norm of each output row taken in fp32. Adapters this merge cannot express exactly are refused
with a clear error, never approximated: other variants, ``lora_bias``, several active adapters,
``fan_in_fan_out`` layers, trainable-token deltas.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class MergePlan:
    """What the merge changes: ``deltas[key] = (A, B, scaling)``, ``magnitudes[key] = m`` (DoRA),
    ``replacements[key] = tensor``."""

    deltas: dict = field(default_factory=dict)
    magnitudes: dict = field(default_factory=dict)
    replacements: dict = field(default_factory=dict)
    untie: bool = False

    def renamed(self, name) -> "MergePlan":
        """The same plan keyed by ``name(key)`` (runtime names -> the checkpoint's)."""
        return MergePlan({name(k): v for k, v in self.deltas.items()}, {name(k): v for k, v in self.magnitudes.items()},
                         {name(k): v for k, v in self.replacements.items()}, self.untie)


def plan_merge(peft_model) -> MergePlan:
    """The LoRA deltas and whole-tensor replacements of ``peft_model``'s active adapter."""
    from peft.tuners.lora import LoraLayer

    adapters = list(peft_model.base_model.active_adapters)
    if len(adapters) != 1:
        raise ValueError(f"Merging needs exactly one active adapter, got {adapters}; call set_adapter(name) first.")
    adapter = adapters[0]
    plan = MergePlan()
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            _check_mergeable(name, module, adapter)
            plan.deltas[f"{name}.weight"] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                             float(module.scaling[adapter]))
            if adapter in getattr(module, "lora_magnitude_vector", {}):
                plan.magnitudes[f"{name}.weight"] = module.lora_magnitude_vector[adapter].weight
        elif type(module).__name__ == "ModulesToSaveWrapper" and adapter in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter].named_parameters():
                plan.replacements[f"{name}.{pname}"] = param
        elif type(module).__name__ == "TrainableTokensWrapper":
            raise ValueError("Merging trainable_token_indices adapters is not supported yet; save with "
                             "save_method='lora', or train the embeddings with modules_to_save.")
    if getattr(base.config.get_text_config(), "tie_word_embeddings", False):
        touched = {k for k in plan.replacements} | set(plan.deltas)
        plan.untie = any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in touched)
    return plan


def _check_mergeable(name: str, module, adapter: str) -> None:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        raise ValueError(f"{name} uses the LoRA variant {type(variant).__name__}, which this merge does not support; "
                         "save with save_method='lora'.")
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{name} has lora_bias=True, which this merge does not support yet; "
                         "save with save_method='lora'.")
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError(f"{name} stores its weight transposed (fan_in_fan_out), which this merge does not support.")


def merged_tensor(key: str, tensor: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """The output tensor for checkpoint entry ``key``: merged in fp32, cast once to its dtype."""
    if key in plan.replacements:
        return plan.replacements[key].detach().to(tensor.dtype).cpu().contiguous()
    if key not in plan.deltas:
        return tensor
    lora_a, lora_b, scaling = plan.deltas[key]
    delta = (lora_b.detach().float() @ lora_a.detach().float()).cpu() * scaling
    if delta.shape != tensor.shape:
        raise ValueError(f"The LoRA delta of {key} has shape {tuple(delta.shape)} but the base tensor has "
                         f"{tuple(tensor.shape)}; the adapter does not belong to this checkpoint.")
    merged = tensor.float() + delta
    if key in plan.magnitudes:  # DoRA: rescale each output row to its learned magnitude
        magnitude = plan.magnitudes[key].detach().float().cpu()
        merged = merged * (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged.to(tensor.dtype)


def checkpoint_files(directory: Path) -> list[Path] | None:
    """The safetensors files of a local checkpoint directory, or None when there are none."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_NAME
    return [single] if single.is_file() else None


def iter_checkpoint(files: list[Path]):
    """``(key, tensor)`` one at a time from safetensors files (memory-mapped reads)."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (a tensor larger than
    that gets a shard of its own), then names them ``model-0000i-of-0000n`` with an index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        if len(self.shards) == 1:
            final = self.directory / WEIGHTS_NAME
            os.replace(self.shards[0][0], final)
            return [final.name]
        count, weight_map, names = len(self.shards), {}, []
        for i, (path, keys) in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names
