"""Which LoRA projections take the fused path (``kernels.lora``), decided at every call.

The patched attention and MLP forwards ask here before calling their projections. A group (q/k/v,
o, gate/up/down) is fused only when the fused maths is an exact replacement for PEFT's modules:

* every projection is a frozen ``nn.Linear`` or a bitsandbytes NF4 ``Linear4bit``, bare or inside
  a PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit``;
* for each LoRA layer: adapters enabled and not merged, exactly one active adapter, no dropout,
  no ``lora_bias``, no variant (DoRA and friends), input dtype casting on, no forward hooks (PEFT's
  mixed-adapter batches pass ``adapter_names`` through hooks), base weight and bias frozen;
* at least one projection of the group carries an adapter (otherwise the plain path is the same);
* no parameter of the group is an FSDP2 shard (a ``DTensor``: a projection or adapter wrapped as an
  FSDP unit of its own is unsharded only by its own forward; inside an FSDP unit's forward, as with
  one unit per decoder layer, the parameters are full tensors and the group fuses), and none is
  partitioned by DeepSpeed ZeRO-3 (gathered only around its own module's forward).

Anything else runs PEFT's own modules (our norm/RoPE/CE kernels still apply), and the first time
a reason is seen in a model one log line names it and the layers it affects.

One choice is about speed, not maths: without gradients on CUDA (generation), a group with NF4
bases runs through bitsandbytes, whose inference kernel multiplies by the packed weight directly
(``gemv_4bit``) instead of dequantising it for every decoded token as the training path does. The decision is
re-made at every call, so ``disable_adapter()``, ``set_adapter``, ``merge_adapter`` and the like
switch paths immediately and never give silently different maths.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch
from torch import nn

from ..kernels.lora import Projection, lora_linear, lora_mlp, lora_projections
from .sharding import is_shard, is_zero3_partitioned

logger = logging.getLogger(__name__)

_LOG_ATTR = "_unsloth_like_fusion_log"
QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PACKED_QKV = ("qkv_proj",)  # Phi-3: q, k and v in one layer
PACKED_MLP = ("gate_up_proj", "down_proj")  # Phi-3: gate and up in one layer


class Fallback:
    """Why a projection cannot take the fused path; ``lora`` says whether it carries an adapter
    (a plain layer without one falls back silently: nothing is lost)."""

    __slots__ = ("reason", "lora")

    def __init__(self, reason: str, lora: bool):
        self.reason, self.lora = reason, lora

    def __repr__(self) -> str:
        return f"Fallback({self.reason!r}, lora={self.lora})"


def describe_projection(module: nn.Module) -> Projection | Fallback:
    """The fused-path description of one projection module, or why there is none."""
    lora_layer = _peft_lora_layer_class()
    if lora_layer is not None and isinstance(module, lora_layer):
        return _describe_lora_layer(module)
    return _describe_base(module, lora=False)


def _describe_lora_layer(m) -> Projection | Fallback:
    reason = _lora_layer_blocker(m)
    if reason is not None:
        return Fallback(reason, lora=True)
    name = m.active_adapters[0]
    base = _describe_base(m.base_layer, lora=True)
    if isinstance(base, Fallback) or name not in m.lora_A:
        return base  # no adapter for the active name here: the base layer alone
    return replace(base, lora_A=m.lora_A[name].weight, lora_B=m.lora_B[name].weight, scaling=float(m.scaling[name]))


def _lora_layer_blocker(m) -> str | None:
    """The first reason PEFT's forward of this layer differs from the fused maths, or None."""
    split = _split_parameters(m)  # first: ZeRO-3's own hooks would read as a user's below
    if split is not None:
        return split
    if _has_hooks(m):
        return "forward hooks on the layer (e.g. a mixed-adapter batch with adapter_names=)"
    if m.disable_adapters:
        return "adapters disabled"
    if m.merged:
        return "adapter merged into the base weights"
    active = list(m.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if name not in m.lora_A:
        return None
    if name in getattr(m, "lora_variant", {}):
        return f"LoRA variant {type(m.lora_variant[name]).__name__} (e.g. use_dora=True)"
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return "lora_dropout > 0"
    if getattr(m, "lora_bias", {}).get(name, False) or m.lora_B[name].bias is not None:
        return "lora_bias=True"
    if m.lora_A[name].bias is not None or type(m.lora_A[name]) is not nn.Linear:
        return f"adapter module {type(m.lora_A[name]).__name__}"
    if not getattr(m, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if type(m).__name__ not in ("Linear", "Linear4bit"):
        return f"PEFT layer {type(m).__module__}.{type(m).__name__}"
    return None


def _describe_base(base: nn.Module, lora: bool) -> Projection | Fallback:
    split = _split_parameters(base)
    if split is not None:
        return Fallback(split, lora)
    if _has_hooks(base) or hasattr(base, "_hf_hook"):
        return Fallback("forward hooks on the base layer (e.g. accelerate offloading)", lora)
    bias = getattr(base, "bias", None)
    if type(base) is nn.Linear:
        if base.weight.requires_grad or (bias is not None and bias.requires_grad):
            return Fallback("trainable base weight or bias", lora)
        return Projection(base.weight, bias)
    if type(base).__module__.startswith("bitsandbytes"):
        return _describe_bitsandbytes(base, bias, lora)
    return Fallback(f"base layer {type(base).__name__}", lora)


def _describe_bitsandbytes(base, bias, lora: bool) -> Projection | Fallback:
    import bitsandbytes as bnb

    if not isinstance(base, bnb.nn.Linear4bit):
        return Fallback(f"bitsandbytes {type(base).__name__} base (only NF4 4-bit is dequantised in the fused path)", lora)
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None:  # FSDP2 unshards a Params4bit into a plain Parameter; bitsandbytes keeps a copy
        quant_state = getattr(base, "quant_state", None)
    if quant_state is None or quant_state.quant_type != "nf4":
        return Fallback("4-bit base that is not NF4", lora)
    if getattr(quant_state, "packing_format_for_cpu", False):
        return Fallback("bitsandbytes repacked this 4-bit weight for CPU inference", lora)
    if bias is not None and bias.requires_grad:
        return Fallback("trainable base weight or bias", lora)
    return Projection(base.weight.data, bias, quant_state, base.compute_dtype)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# FSDP2 units unshard their parameters in their own forward hooks: a LoRA module or linear layer
# that is a unit of its own holds only its shard (a DTensor) when the attention or MLP reads it.
_SHARDED = "parameters sharded by FSDP (a unit of their own): PEFT's modules run, which unshard them"
# DeepSpeed ZeRO-3 gathers a module's parameters in hooks around that module's own forward.
_ZERO3 = "parameters partitioned by DeepSpeed ZeRO-3: PEFT's modules run, which gather them"


def _split_parameters(module: nn.Module) -> str | None:
    """Why ``module``'s parameters are not whole here (an FSDP2 shard, a ZeRO-3 partition), or None.
    Iterating parameters reads no ``module.weight``, so it starts no ZeRO-3 gather."""
    for param in module.parameters():
        if is_zero3_partitioned(param):
            return _ZERO3
        if is_shard(param):
            return _SHARDED
    return None


@functools.cache
def _peft_lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but a model without it simply has no LoRA layers
        return None
    return LoraLayer


# --- groups ---------------------------------------------------------------------------------------


def plan_group(owner: nn.Module, names: tuple[str, ...]) -> list[Projection] | Fallback:
    """The projections of one group when all can fuse and one has an adapter, else why not."""
    projections = [describe_projection(getattr(owner, name)) for name in names]
    blocked = [(name, p) for name, p in zip(names, projections) if isinstance(p, Fallback)]
    if blocked:
        lora_blocked = [(name, p) for name, p in blocked if p.lora]
        if lora_blocked:
            return lora_blocked[0][1]
        if any(not isinstance(p, Fallback) and p.has_lora for p in projections):
            return Fallback(f"{blocked[0][0]}: {blocked[0][1].reason}", lora=True)
        return blocked[0][1]
    if not any(p.has_lora for p in projections):
        return Fallback("no adapter in the group", lora=False)
    if len({p.lora_A.dtype for p in projections if p.has_lora}) > 1:
        return Fallback("adapters of one group in different dtypes", lora=True)
    return projections


def fused_qkv(attention: nn.Module, hidden_states: torch.Tensor):
    plan = _plan(attention, QKV, hidden_states)
    return None if plan is None else lora_projections(hidden_states, *plan)


def fused_o(attention: nn.Module, attn_output: torch.Tensor):
    plan = _plan(attention, ("o_proj",), attn_output)
    return None if plan is None else lora_linear(attn_output, plan[0])


def fused_mlp(mlp: nn.Module, x: torch.Tensor, activation: str):
    plan = _plan(mlp, MLP, x)
    return None if plan is None else lora_mlp(x, *plan, activation=activation)


def fused_packed_qkv(attention: nn.Module, hidden_states: torch.Tensor):
    """``qkv_proj``'s output (split by the caller), or None for PEFT's module."""
    plan = _plan(attention, PACKED_QKV, hidden_states)
    return None if plan is None else lora_linear(hidden_states, plan[0])


def fused_packed_mlp(mlp: nn.Module, x: torch.Tensor, gate):
    """``down(gate(g, u))`` with ``g, u`` the halves of ``gate_up_proj(x)``; ``gate`` is the gated
    activation. Two LoRA projections around the activation kernel: a packed NF4 weight cannot be
    split into the separate gate and up weights ``lora_mlp`` takes."""
    plan = _plan(mlp, PACKED_MLP, x)
    if plan is None:
        return None
    gate_up, down = plan
    g, u = lora_linear(x, gate_up).chunk(2, dim=-1)
    return lora_linear(gate(g, u), down)


def _plan(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor):
    plan = plan_group(owner, names)
    if isinstance(plan, Fallback):
        if plan.lora:
            log = getattr(owner, _LOG_ATTR, None)
            if log is not None:
                log.once(plan.reason)
        return None
    if x.is_cuda and not torch.is_grad_enabled() and any(p.quantized for p in plan):
        return None  # bitsandbytes' 4-bit inference kernels (see the module docstring)
    return plan


# --- reporting ------------------------------------------------------------------------------------


class FusionLog:
    """Logs each fallback reason once per model, naming the groups it affects."""

    def __init__(self, groups: dict[str, tuple[nn.Module, tuple[str, ...]]]):
        self.groups, self.seen = groups, set()

    def once(self, reason: str) -> None:
        if reason in self.seen:
            return
        self.seen.add(reason)
        affected = [name for name, (owner, names) in self.groups.items()
                    if isinstance(p := plan_group(owner, names), Fallback) and p.reason == reason]
        logger.info("Fused LoRA path off for %s (%s): PEFT's modules run there.", _summarise(affected), reason)


def attach_fusion_log(groups: dict[str, tuple[nn.Module, tuple[str, ...]]]) -> FusionLog:
    log = FusionLog(groups)
    for owner, _ in groups.values():
        object.__setattr__(owner, _LOG_ATTR, log)  # a plain attribute, not a submodule
    return log


def detach_fusion_log(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(_LOG_ATTR, None)


def fusion_report(groups: dict[str, tuple[nn.Module, tuple[str, ...]]]) -> dict[str, str]:
    """``{group name: "fused" | reason}`` for the model's current state."""
    report = {}
    for name, (owner, names) in groups.items():
        plan = plan_group(owner, names)
        report[name] = "fused" if not isinstance(plan, Fallback) else plan.reason
    return report


def _summarise(names: list[str], limit: int = 4) -> str:
    if not names:
        return "some layers"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
