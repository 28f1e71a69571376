"""Gated MLP activations: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu(gate, up) = gelu(gate) * up``.

Numerics follow Hugging Face's MLPs (``act_fn(gate_proj(x)) * up_proj(x)``): the activation is
computed in fp32, rounded to the input dtype (HF's activation returns the input dtype), and the
product is rounded once more. Backward recomputes the activation from ``gate`` (nothing but the
two inputs is saved) and writes both gradients in one pass.

Elementwise over any shape; offsets are int64 so tensors beyond 2**31 elements index correctly.
``geglu`` takes ``approximate="none"`` (erf GELU, Gemma 1's ``gelu``) or ``"tanh"``
(``gelu_pytorch_tanh``, Gemma 2/3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Backend, register_op, select_backend
from ._common import check_float_tensor, check_same_device, tl, triton

register_op("swiglu", "silu(gate) * up, fused forward and backward")
register_op("geglu", "gelu(gate) * up (erf or tanh GELU), fused forward and backward")

_BLOCK = 1024
# Globals read inside @triton.jit functions must be constexpr.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)
GELU_APPROXIMATIONS = ("none", "tanh")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


@triton.jit
def _tanh(x):
    # Through exp(-2|x|) <= 1, so nothing overflows for large |x| (saturates cleanly to +-1).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _activation_and_derivative(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32. ACTIVATION: 0 silu, 1 erf gelu, 2 tanh gelu."""
    if ACTIVATION == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * _SQRT_HALF))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    else:
        inner = _SQRT_2_OVER_PI * (g + _GELU_TANH_C * g * g * g)
        t = _tanh(inner)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * g * g)
    return act, dact


@triton.jit
def _gated_forward_kernel(GATE, UP, OUT, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_derivative(g, ACTIVATION)
    act = act.to(OUT.dtype.element_ty).to(tl.float32)  # HF: the activation returns the input dtype
    tl.store(OUT + offsets, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(DOUT, GATE, UP, DGATE, DUP, OUT, n, ACTIVATION: tl.constexpr, STORE_OUT: tl.constexpr,
                           BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation_and_derivative(g, ACTIVATION)
    act = act.to(DUP.dtype.element_ty).to(tl.float32)
    tl.store(DUP + offsets, (dout * act).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offsets, (dout * u * dact).to(DGATE.dtype.element_ty), mask=mask)
    if STORE_OUT:  # the forward output, recomputed for free (the fused LoRA MLP needs it)
        tl.store(OUT + offsets, (act * u).to(OUT.dtype.element_ty), mask=mask)


ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # names for the primitives below
_KERNEL_ACTIVATION = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` without autograd (for fused autograd Functions that save their own
    tensors). ``activation``: ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``."""
    _check_activation(activation)
    if select_backend(gate, up) is Backend.TORCH or gate.numel() == 0:
        return _torch_activation(gate, activation) * up
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _gated_forward_kernel[(triton.cdiv(n, _BLOCK),)](
        gate, up, out, n, ACTIVATION=_KERNEL_ACTIVATION[activation], BLOCK=_BLOCK)
    return out


def gated_activation_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu",
                              need_out: bool = False):
    """Gradients of ``act(gate) * up``: returns ``(dgate, dup, out)``, where ``out`` is the
    forward output recomputed in the same pass when ``need_out`` (else None)."""
    _check_activation(activation)
    if select_backend(dout, gate, up) is Backend.TORCH or gate.numel() == 0:
        # The same aten ops autograd runs for the reference, so results equal it bit for bit.
        act = _torch_activation(gate, activation)
        dup = dout * act
        grad_act = dout * up
        if activation == "silu":
            dgate = torch.ops.aten.silu_backward(grad_act, gate)
        else:
            dgate = torch.ops.aten.gelu_backward(grad_act, gate, approximate="none" if activation == "gelu" else "tanh")
        return dgate, dup, (act * up if need_out else None)
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    out = torch.empty_like(gate) if need_out else dgate  # any valid pointer when not stored
    n = gate.numel()
    _gated_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        dout, gate, up, dgate, dup, out, n, ACTIVATION=_KERNEL_ACTIVATION[activation], STORE_OUT=need_out,
        BLOCK=_BLOCK)
    return dgate, dup, (out if need_out else None)


def _torch_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="none" if activation == "gelu" else "tanh")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")


class _GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return gated_activation_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup, _ = gated_activation_backward(dout, gate, up, ctx.activation)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama, Mistral, Qwen MLPs)."""
    _validate(gate, up)
    if select_backend(gate, up) is Backend.TORCH or gate.numel() == 0:
        return swiglu_reference(gate, up)
    return _GatedActivationFunction.apply(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` (Gemma MLPs); ``approximate`` is "none" (erf) or "tanh"."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}.")
    _validate(gate, up)
    if select_backend(gate, up) is Backend.TORCH or gate.numel() == 0:
        return geglu_reference(gate, up, approximate)
    return _GatedActivationFunction.apply(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def _validate(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float_tensor("gate", gate)
    check_float_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}.")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}.")
    check_same_device(gate=gate, up=up)
