"""Parameters that a distributed engine holds in pieces, and reading them outside their module's forward.

Two engines split parameters across ranks: FSDP2 (``fully_shard``: each parameter a ``DTensor``
shard, gathered in hooks around its unit's forward) and DeepSpeed ZeRO-3 (each parameter an empty
local tensor with ``ds_*`` attributes, gathered in hooks around every module's forward).

Under ZeRO-3 our fused paths step aside (``lora_fusion``, ``causal_lm``): PEFT's modules and
upstream's head run, and DeepSpeed's hooks gather their parameters. Reading ``module.weight``
there would start a gather of its own, on whichever ranks happen to read it.

Under FSDP2 the backward hooks of a unit hang on its forward's inputs. Our fused loss reads
``lm_head.weight`` without calling ``lm_head`` (the logits are never made), so when the head is a
unit, or part of one, the loss must run as that unit's forward would:

* Part of a unit that is already gathered (accelerate's ``[final norm, lm_head]`` tail unit, kept
  gathered after the norm's forward): the weight is a whole tensor, and the unit's own hooks
  (which FSDP registered) change nothing we read. The loss reads it directly.
* A unit whose weight is still a shard (a ``DTensor``, e.g. a wrap policy that makes the head a
  unit of its own): the loss runs as a forward method of the unit (FSDP2's
  ``register_fsdp_forward_method``), which gathers the weight, lets the unit's backward hooks see
  the hidden states (so its gradient is reduce-scattered as after ``lm_head(hidden)``), and frees
  the gathered weight afterwards as the unit's settings say.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_FORWARD_METHOD = "_unsloth_like_forward_as_unit"


def is_shard(tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a ``DTensor``) rather than a whole tensor."""
    return type(tensor).__name__ == "DTensor"


def is_zero3_partitioned(param) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``param`` (whatever its current status)."""
    return getattr(param, "ds_id", None) is not None


def fsdp_unit(module: nn.Module) -> nn.Module | None:
    """``module`` when it is an FSDP2 unit (or one module of a grouped unit), else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # fully_shard needs a process group: no unit can exist without one
    from torch.distributed.fsdp import FSDPModule

    return module if isinstance(module, FSDPModule) else None


def module_class(module: nn.Module) -> type:
    """The class ``module`` had before ``fully_shard`` made it a unit (which swaps in a subclass,
    ``FSDP<Class>``, whose last base is the original); its own class otherwise."""
    return type(module).__bases__[-1] if fsdp_unit(module) is not None else type(module)


def only_fsdp_hooks(module: nn.Module) -> bool:
    """Whether every forward hook on ``module`` is one FSDP2 registered (they gather and free its
    parameters around its forward and change no values); any other hook may change what the
    module computes, so its forward must run."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(getattr(hook, "__module__", "").startswith("torch.distributed.fsdp.") for hook in hooks)


def call_as_forward(unit: nn.Module | None, function, *args):
    """``function(*args)`` run as a forward of the FSDP2 ``unit`` (its parameters gathered before,
    its backward hooks on ``args``); a plain call when ``unit`` is None. ``function`` must read
    the unit's parameters itself: they are shards until the unit's pre-forward hook has run."""
    if unit is None:
        return function(*args)
    if _FORWARD_METHOD not in vars(unit):
        from torch.distributed.fsdp import register_fsdp_forward_method

        # An instance attribute of this unit only; FSDP2 wraps it in the unit's hooks.
        setattr(unit, _FORWARD_METHOD, types.MethodType(lambda self, fn, *a: fn(*a), unit))
        register_fsdp_forward_method(unit, _FORWARD_METHOD)
    return getattr(unit, _FORWARD_METHOD)(function, *args)
