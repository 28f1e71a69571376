"""Gradient checkpointing per model instance, with Unsloth's offloaded mode.

``use_gradient_checkpointing``:

* ``"unsloth"``: every decoder layer is checkpointed, and the one tensor kept per layer (its input
  hidden states) goes to pinned CPU memory on a side CUDA stream during forward, coming back for
  backward, where the layer is recomputed. Device memory for activations is then about one layer's
  worth whatever the depth. On CPU there is nothing to offload to: plain checkpointing. In a
  multi-process run (DDP, FSDP2) it is torch's non-reentrant checkpoint without the offload: the
  recomputation inside backward that offloading needs is what DDP refuses.
* ``True``: standard (non-reentrant) ``torch.utils.checkpoint`` on every decoder layer.
* ``False``: none.

The mechanism is transformers' own: ``_set_gradient_checkpointing(gradient_checkpointing_func=…)``
stores the function on *this model's* layers (``GradientCheckpointingLayer`` calls it), so nothing
process-wide changes, ``torch.utils.checkpoint`` included. The Trainer turns checkpointing on by
default (TRL's ``SFTConfig(gradient_checkpointing=True)``); a per-instance override of
``activation_checkpointing_enable`` keeps the mode chosen here unless the trainer asks for
something specific (``every_n_layers``, ``offload``, checkpoint kwargs), which then wins.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..distributed import multi_process

logger = logging.getLogger(__name__)

_MODE_ATTR = "_unsloth_like_checkpointing"  # the mode set by us, on the CausalLM
_OVERRIDE_NAMES = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def check_mode(mode) -> None:
    if not (mode is True or mode is False or mode == "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be 'unsloth', True or False, got {mode!r}.")


def set_gradient_checkpointing(model: nn.Module, mode) -> None:
    """Apply ``mode`` to the decoder layers of ``model`` (a CausalLM or a PEFT model around one)."""
    check_mode(mode)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode is False:
        # transformers 5 renamed the property and warns on the old name; older releases lack the new one
        enabled = getattr(root, "is_activation_checkpointing", None)
        if enabled is None:
            enabled = getattr(root, "is_gradient_checkpointing", False)
        if enabled:
            disable = getattr(root, "activation_checkpointing_disable", None) or root.gradient_checkpointing_disable
            disable()
        _remove_trainer_override(root)
        root.__dict__.pop(_MODE_ATTR, None)
        return
    if not getattr(root, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(root).__name__} does not support gradient checkpointing; "
                         "pass use_gradient_checkpointing=False.")
    function = offloaded_checkpoint if mode == "unsloth" else functools.partial(checkpoint, use_reentrant=False)
    root._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    root.__dict__[_MODE_ATTR] = mode
    _install_trainer_override(root)


def checkpointing_mode(model: nn.Module):
    """The mode currently active on ``model``'s layers: ``"unsloth"``, ``True`` or ``False``."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in root.modules():
        if getattr(module, "gradient_checkpointing", False) is True and module is not root:
            return "unsloth" if getattr(module, "_gradient_checkpointing_func", None) is offloaded_checkpoint else True
    return False


# --- the Trainer's request ------------------------------------------------------------------------


def _install_trainer_override(root: nn.Module) -> None:
    name = next(n for n in _OVERRIDE_NAMES if hasattr(type(root), n))
    if name not in root.__dict__:
        root.__dict__[name] = types.MethodType(functools.partial(_trainer_enable, upstream_name=name), root)


def _remove_trainer_override(root: nn.Module) -> None:
    for name in _OVERRIDE_NAMES:
        root.__dict__.pop(name, None)


def _trainer_enable(self, *args, upstream_name: str, every_n_layers: int = 1, offload: bool = False, **kwargs):
    given = args[0] if args else (kwargs.get("activation_checkpointing_kwargs")
                                  or kwargs.get("gradient_checkpointing_kwargs"))
    # ours are non-reentrant; use_reentrant changes how, not what, gradients are computed
    specific = {k for k in (given or {}) if k != "use_reentrant"}
    others = set(kwargs) - {"activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"}
    mode = self.__dict__.get(_MODE_ATTR)
    if mode is not None and checkpointing_mode(self) == mode and every_n_layers == 1 and not offload \
            and not specific and not others:
        logger.info("Gradient checkpointing stays %r (set by get_peft_model/from_pretrained).", mode)
        return
    _remove_trainer_override(self)
    self.__dict__.pop(_MODE_ATTR, None)
    if every_n_layers != 1:  # only when asked: older transformers releases lack these parameters
        kwargs["every_n_layers"] = every_n_layers
    if offload:
        kwargs["offload"] = offload
    getattr(type(self), upstream_name)(self, *args, **kwargs)


# --- offloaded checkpointing ----------------------------------------------------------------------


def offloaded_checkpoint(function, *args, **kwargs):
    """``GradientCheckpointingLayer``'s checkpoint function: ``function(hidden_states, *rest)``
    recomputed in backward, with ``hidden_states`` parked in pinned CPU memory meanwhile."""
    hidden_states, rest = (args[0], args[1:]) if args else (None, ())
    general = (kwargs or not isinstance(hidden_states, torch.Tensor)
               or any(isinstance(a, torch.Tensor) and a.requires_grad for a in rest))
    # Something else needs gradients: torch's own checkpoint handles every case. Several processes
    # (DDP): ours recomputes inside backward (reentrant), which DDP refuses; torch's non-reentrant
    # one does not (the input then stays on the device).
    if general or multi_process():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    run = function if not rest else (lambda h: function(h, *rest))
    return _OffloadedCheckpoint.apply(run, hidden_states, _grad_anchor(function))


def _grad_anchor(function) -> torch.Tensor | None:
    """A tensor requiring grad when the layer has trainable parameters, so backward runs even when
    the hidden states entering it do not require grad (frozen embeddings under LoRA) — without
    ``enable_input_require_grads``."""
    layer = next((a for a in getattr(function, "args", ()) if isinstance(a, nn.Module)), None)
    if layer is None or any(p.requires_grad for p in layer.parameters()):
        return torch.empty(0, requires_grad=True)
    return None


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden_states, anchor):
        ctx.run = run
        ctx.rng = _RngState(hidden_states.device)
        device_type = hidden_states.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        with torch.no_grad():
            output = run(hidden_states)
        ctx.stash = _Stash(hidden_states)
        ctx.is_tuple = isinstance(output, tuple)
        return output

    @staticmethod
    def backward(ctx, *grads):
        hidden_states = ctx.stash.restore().detach().requires_grad_(ctx.needs_input_grad[1])
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), ctx.rng.restored(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            output = ctx.run(hidden_states)
        outputs = output if ctx.is_tuple else (output,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.stash = ctx.run = None
        return None, (hidden_states.grad if ctx.needs_input_grad[1] else None), None


class _Stash:
    """The layer input while the rest of the forward runs: on CUDA a pinned CPU copy made on a
    side stream (the compute stream does not wait for it); elsewhere the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        if tensor.device.type != "cuda":
            self.tensor = tensor
            return
        stream = _side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor must be computed first
        self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.tensor.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def restore(self) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.tensor
        torch.cuda.current_stream(self.device).wait_event(self.copied)
        return self.tensor.to(self.device, non_blocking=True)


@functools.cache
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device)


class _RngState:
    """RNG states at forward time, restored for the recomputation (dropout masks match)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, rng in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(rng, device)
            yield
