"""Right 4-bit maths, per model, on hosts where bitsandbytes' CPU dequantisation is wrong.

On such hosts (``host.bitsandbytes_cpu_probe()`` says ``wrong``; bitsandbytes' AVX512 CPU path,
see ``unsloth_like.host``) every bitsandbytes NF4 ``Linear4bit`` of the model that lives on the CPU
and whose rows are not a multiple of its blocksize gets an instance ``forward`` that, for CPU
inputs, computes what bitsandbytes' forward computes (input cast to the compute dtype,
dequantised weight in that dtype, output cast back) with our NF4 dequantisation, through
``kernels.lora``'s autograd (the weight is dequantised again in backward, never saved, as
bitsandbytes does). Inputs on other devices go to the class's forward unchanged. PEFT's LoRA
layers call their base layer's ``forward``, so unfused PEFT paths, unpatched architectures and
``FastModel`` loads are covered too; our fused QLoRA path never calls bitsandbytes'
dequantisation in the first place.

This skips one bitsandbytes side effect on those layers: its CPU inference repacking
(``packing_format_for_cpu`` on the first no-grad forward), which cannot represent such rows anyway.

That repacking is switched off for every CPU 4-bit layer of the model (``support_avx512bf16_for_cpu``
set to False on the instance), on every host whose CPU has avx512_bf16 (where bitsandbytes
repacks), whatever the probe says. It has two faults there: it asserts that the output size is a
multiple of 32, so a layer such as Qwen2.5-VL-7B's vision MLP (3420 outputs) fails in the first
eval-mode, no-grad forward; and a repacked weight stays repacked, so training after inference
(Unsloth's vision notebooks generate before they train) fails inside bitsandbytes' matmul. The
layers then compute as in training: dequantise and multiply (inference on CPU is slower than with
bitsandbytes' AVX512-bf16 kernel, and right).

What stays bitsandbytes' and is named in the one warning per model: FP4 layers (our kernel is NF4
only) and PEFT's in-place ``merge_adapter`` / ``merge_and_unload`` of 4-bit layers (they call
bitsandbytes' dequantisation directly; ``save_pretrained_merged`` does not).
"""

from __future__ import annotations

import logging
import re

import torch.nn.functional as F
from torch import nn

from ..host import DequantizeProbe, bitsandbytes_cpu_probe
from ..kernels.lora import Projection, lora_linear
from ..kernels.quant import dequantize_nf4
from .patching import _bind, _root, _unbind

logger = logging.getLogger(__name__)

_GUARD_ATTR = "_unsloth_like_nf4_cpu_guard"  # on the root model: the _bind records


def guard_4bit_layers(model: nn.Module, probe: DequantizeProbe | None = None) -> list[str]:
    """Route the affected 4-bit layers of ``model`` through our dequantisation when this host's
    bitsandbytes needs it; returns the names of the guarded layers (empty elsewhere).

    Affected: bitsandbytes 4-bit layers whose weight is on the CPU and whose rows are not a
    multiple of the blocksize (a model on a GPU is left alone: call this again after moving one
    to the CPU). Idempotent: a model already guarded keeps its guard. ``probe`` defaults to this
    host's, which runs only when the model has such layers. On avx512_bf16 hosts every CPU 4-bit
    layer also loses bitsandbytes' inference repacking (see the module docstring).
    """
    root = _root(model)
    if _GUARD_ATTR in root.__dict__:
        return list(root.__dict__[_GUARD_ATTR][0])
    modules = list(model.named_modules())
    records: list = []
    repacking = [module for _, module in modules if _repacks_for_inference(module)]
    for module in repacking:
        records.append((module, "support_avx512bf16_for_cpu", True))
        module.support_avx512bf16_for_cpu = False
    candidates = [(name, module) for name, module in modules if _is_affected(module)]
    guarded, unfixable = [], []
    if candidates:
        probe = probe if probe is not None else bitsandbytes_cpu_probe()
        if not probe.wrong:
            candidates = []
    for name, module in candidates:
        name = name or type(module).__name__  # a bare layer is its own root
        if module.weight.quant_state.quant_type != "nf4":
            unfixable.append(name)
            continue
        _bind(module, _guarded_forward, records)
        guarded.append(name)
    if records:
        root.__dict__[_GUARD_ATTR] = (guarded, records)
    if repacking:
        logger.info("bitsandbytes' CPU inference repacking is off for %d 4-bit layers of this model: it breaks "
                    "training after an eval-mode forward and cannot hold output sizes that are not multiples of 32.",
                    len(repacking))
    if guarded or unfixable:
        _warn(probe, guarded, unfixable)
    return guarded


def unguard_4bit_layers(model: nn.Module) -> None:
    """Give the guarded layers their bitsandbytes forward (and inference repacking) back."""
    _, records = _root(model).__dict__.pop(_GUARD_ATTR, ([], []))
    _unbind(records)


def _guarded_forward(self, x, *args, **kwargs):
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)  # as bitsandbytes' forward: a weight re-wrapped (FSDP) gets its state back
    quant_state = self.weight.quant_state
    if x.device.type != "cpu" or getattr(quant_state, "packing_format_for_cpu", False):
        return type(self).forward(self, x, *args, **kwargs)
    if not self.compute_type_is_set:  # bitsandbytes' first-call bookkeeping (and its dtype warnings)
        self.set_compute_type(x)
        self.compute_type_is_set = True
    dtype = self.compute_dtype or x.dtype
    bias = self.bias
    if bias is not None and bias.dtype != dtype:
        bias.data = bias.data.to(dtype)  # as bitsandbytes' forward does: the bias lives in the compute dtype
    if bias is not None and bias.requires_grad:  # a trainable bias needs its gradient: plain autograd
        weight = dequantize_nf4(self.weight.data, quant_state).to(dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)
    return lora_linear(x, Projection(self.weight.data, bias, quant_state, self.compute_dtype))


def _is_affected(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer on the CPU whose rows (the last dimension) are not a multiple of
    the blocksize: what the wrong path mis-scales. (It is right on other rows, so those layers
    keep bitsandbytes' own kernels.)"""
    if not type(module).__module__.startswith("bitsandbytes") or not hasattr(module, "compute_type_is_set"):
        return False
    if not any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__):
        return False
    state = getattr(module.weight, "quant_state", None)
    if state is None or module.weight.device.type != "cpu" or not state.shape:
        return False
    return int(state.shape[-1]) % int(state.blocksize) != 0


def _repacks_for_inference(module: nn.Module) -> bool:
    """A CPU 4-bit layer bitsandbytes would repack on its first eval-mode no-grad forward."""
    if not type(module).__module__.startswith("bitsandbytes") or not getattr(module, "support_avx512bf16_for_cpu", False):
        return False
    return getattr(module.weight, "quant_state", None) is not None and module.weight.device.type == "cpu"


def _warn(probe: DequantizeProbe, guarded: list[str], unfixable: list[str]) -> None:
    message = (f"bitsandbytes dequantises 4-bit weights wrongly on this CPU (its AVX512 path mis-scales rows "
               f"that are not a multiple of the blocksize; max error {probe.max_error:.3g} in a probe).")
    if guarded:
        message += (f" {len(guarded)} NF4 layers of this model ({summarize_names(guarded)}) compute with "
                    "unsloth_like's dequantisation on CPU instead; PEFT's merge_adapter()/merge_and_unload() "
                    "on them would still call bitsandbytes, use save_pretrained_merged to merge.")
    if unfixable:
        message += (f" {len(unfixable)} FP4 layers ({summarize_names(unfixable)}) keep bitsandbytes' maths and "
                    "will be wrong on CPU: load with bnb_4bit_quant_type='nf4', or run them on a GPU.")
    logger.warning(message)


def summarize_names(names: list[str], limit: int = 6) -> str:
    """Module names with layer indices folded (``model.layers.*.mlp.down_proj``), at most ``limit``."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in names))
    return ", ".join(folded[:limit]) + (f", ... ({len(folded) - limit} more)" if len(folded) > limit else "")

