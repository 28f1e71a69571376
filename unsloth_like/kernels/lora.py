"""Fused LoRA projections: O, QKV (one read of X for the three adapters) and the gated MLP.

A LoRA projection computes ``y = X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ`` with a frozen base weight ``W`` (dense
fp32/bf16/fp16, or bitsandbytes NF4 dequantised on the fly by ``dequantize_nf4``) and trainable
``A`` (r × in), ``B`` (out × r). The autograd Functions here replace PEFT's module chain
``base_layer(x) + lora_B(lora_A(x)) * scaling`` with hand-derived gradients and save only what
backward needs:

* no dequantised weight is kept: backward dequantises again (one weight at a time);
* per projection only ``X·Aᵀ`` (N × r, small) is saved beside the shared input ``X``;
* the MLP keeps ``gate`` and ``up`` outputs and recomputes ``h = act(gate)·up`` in the backward
  kernel's pass, instead of saving ``h`` for the down projection's adapter as autograd would.

Gradients (``G`` = dY, ``XA = X·Aᵀ``)::

    dB = s·Gᵀ·XA        dXA = s·G·B        dA = dXAᵀ·X        dX = G·W + dXA·A

For QKV (and gate/up in the MLP) the adapters' ``A`` are concatenated (r_q + r_k + r_v rows, a
tiny copy), so ``X·Aᵀ`` and ``dXA·A`` are one matmul each for all three projections.

Dtypes follow PEFT exactly. The base runs in its own dtype (NF4: the layer's compute dtype,
bitsandbytes' rule, output cast back to the input dtype); the adapter runs in the adapter's dtype
(PEFT keeps adapters in fp32 over 16-bit bases); the sum is formed as PEFT forms it: in the
promoted dtype then cast back for dense bases (``lora.Linear``), after casting the adapter output
to the base's output dtype for NF4 bases (``lora.bnb.Linear4bit``). Under autocast the matmuls
autocast as they would in PEFT, and backward re-enters the forward's autocast state.

Pure torch matmuls (cuBLAS on GPU) plus our Triton dequantisation and activation kernels: the
matmuls are not where Triton helps; the memory traffic around them is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._backend import register_op
from .quant import dequantize_nf4
from .swiglu import ACTIVATIONS, gated_activation_backward, gated_activation_forward

register_op("lora", "fused LoRA O / QKV / gated MLP with NF4 dequantisation on the fly (autograd)",
            has_triton=False)


@dataclass(frozen=True)
class Projection:
    """One frozen linear layer and, optionally, one LoRA adapter on it.

    ``weight`` is the dense ``(out, in)`` base weight, or the packed NF4 bytes when
    ``quant_state`` (a bitsandbytes ``QuantState``) is given; ``compute_dtype`` is then the dtype
    the base matmul runs in (bitsandbytes' ``compute_dtype``; None: the input's dtype).
    ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` are both given or both None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    quant_state: Any = None
    compute_dtype: torch.dtype | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0

    @property
    def quantized(self) -> bool:
        return self.quant_state is not None

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1]) if self.quantized else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quantized else self.weight.shape[0]

    def base_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        if self.quantized:
            return self.compute_dtype or input_dtype
        return self.weight.dtype

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight in ``dtype``; NF4 is dequantised now (bitsandbytes' rounding: to the
        state's dtype, then cast)."""
        if not self.quantized:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        dense = dequantize_nf4(self.weight, self.quant_state)
        return dense if dense.dtype == dtype else dense.to(dtype)


def lora_linear(x: torch.Tensor, projection: Projection) -> torch.Tensor:
    """One LoRA projection (the attention output ``o_proj``)."""
    return lora_projections(x, projection)[0]


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection):
    """The q, k and v projections of the same input: one read of ``x`` for the three adapters."""
    return lora_projections(x, q, k, v)


def lora_projections(x: torch.Tensor, *projections: Projection) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of the same input ``x`` (``(..., in)``), fused."""
    _validate(x, projections)
    return _LoraProjectionsFunction.apply(x, projections, *_adapter_tensors(projections))


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
             activation: str = "silu") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three (``activation``: ``"silu"``
    for SwiGLU, ``"gelu"`` / ``"gelu_tanh"`` for GeGLU)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    _validate(x, (gate, up))
    if gate.out_features != up.out_features or down.in_features != gate.out_features:
        raise ValueError(
            f"gate/up/down shapes do not chain: gate out {gate.out_features}, up out {up.out_features}, "
            f"down in {down.in_features}.")
    projections = (gate, up, down)
    return _LoraMLPFunction.apply(x, projections, activation, *_adapter_tensors(projections))


def lora_projections_reference(x: torch.Tensor, *projections: Projection) -> tuple[torch.Tensor, ...]:
    """The same maths through plain autograd (PEFT's module chain), the oracle for tests."""
    return tuple(_reference_projection(x, p) for p in projections)


def lora_mlp_reference(x, gate: Projection, up: Projection, down: Projection, activation: str = "silu"):
    g, u = _reference_projection(x, gate), _reference_projection(x, up)
    if activation == "silu":
        h = F.silu(g) * u
    else:
        h = F.gelu(g, approximate="none" if activation == "gelu" else "tanh") * u
    return _reference_projection(h, down)


def _reference_projection(x, p: Projection):
    base_dtype = p.base_dtype(x.dtype)
    bias = None if p.bias is None else p.bias.to(base_dtype)
    result = F.linear(x.to(base_dtype), p.dense_weight(base_dtype), bias)
    if p.quantized:
        result = result.to(x.dtype)
    if not p.has_lora:
        return result
    lora = F.linear(F.linear(x.to(p.lora_A.dtype), p.lora_A), p.lora_B) * p.scaling
    if p.quantized and not torch.is_autocast_enabled(x.device.type):
        return result + lora.to(result.dtype)
    return (result + lora).to(result.dtype)


# --------------------------------------------------------------------------------------------
# shared forward / backward pieces (no autograd inside)
# --------------------------------------------------------------------------------------------


def _adapter_tensors(projections) -> list:
    return [t for p in projections for t in (p.lora_A, p.lora_B)]


def _with_adapters(projections, adapters) -> tuple[Projection, ...]:
    """The projections with the adapter tensors autograd handed to forward (the same objects)."""
    return tuple(replace(p, lora_A=adapters[2 * i], lora_B=adapters[2 * i + 1]) for i, p in enumerate(projections))


def _lora_groups(projections):
    """Indices of the projections with adapters, and the concatenated A (one X read)."""
    with_lora = [i for i, p in enumerate(projections) if p.has_lora]
    if not with_lora:
        return with_lora, None
    dtypes = {projections[i].lora_A.dtype for i in with_lora}
    if len(dtypes) > 1:
        raise ValueError(f"LoRA A matrices of one fused group must share a dtype, got {sorted(map(str, dtypes))}.")
    a_cat = torch.cat([projections[i].lora_A for i in with_lora]) if len(with_lora) > 1 else projections[with_lora[0]].lora_A
    return with_lora, a_cat


def _forward_projections(x2, projections):
    """Outputs of each projection of ``x2`` (N, in), and the saved ``X·Aᵀ`` per adapter."""
    with_lora, a_cat = _lora_groups(projections)
    xa_parts: dict[int, torch.Tensor] = {}
    if with_lora:
        xa_cat = x2.to(a_cat.dtype) @ a_cat.t()
        ranks = [projections[i].lora_A.shape[0] for i in with_lora]
        xa_parts = dict(zip(with_lora, xa_cat.split(ranks, dim=1)))
    outputs = []
    for i, p in enumerate(projections):
        base_dtype = p.base_dtype(x2.dtype)
        bias = None if p.bias is None else p.bias.to(base_dtype)
        result = F.linear(x2.to(base_dtype), p.dense_weight(base_dtype), bias)
        if p.quantized:
            result = result.to(x2.dtype)
        if i in xa_parts:
            xa = xa_parts[i]
            if not p.quantized and result.dtype == xa.dtype == p.lora_B.dtype:
                # one GEMM with the add in its epilogue; no (N, out) temporary
                result = torch.addmm(result, xa, p.lora_B.t(), alpha=p.scaling)
                outputs.append(result)
                continue
            lora = (xa @ p.lora_B.t()).mul_(p.scaling)
            if p.quantized and not torch.is_autocast_enabled(x2.device.type):
                result = result + lora.to(result.dtype)
            else:
                result = (result + lora).to(result.dtype)
        outputs.append(result)
    return outputs, xa_parts


class _AdapterBackward:
    """The adapter half of a group's backward: ``dXA = s·G·B`` for every adapter (concatenated in
    the order of ``A``'s concatenation) and ``dB``; ``dA`` needs the input and comes later."""

    def __init__(self, projections, xa_parts, grads, need_adapters):
        self.projections, self.need = projections, need_adapters
        self.with_lora, self.a_cat = _lora_groups(projections)
        self.grads: list = [None] * (2 * len(projections))
        self.dxa_cat = None
        if not self.with_lora:
            return
        dxa_parts = []
        for i in self.with_lora:
            p, g = projections[i], grads[i].to(projections[i].lora_B.dtype)
            if need_adapters[2 * i + 1]:
                self.grads[2 * i + 1] = (g.t() @ xa_parts[i]).mul_(p.scaling)
            dxa_parts.append((g @ p.lora_B).mul_(p.scaling))
        self.dxa_cat = torch.cat(dxa_parts, dim=1) if len(dxa_parts) > 1 else dxa_parts[0]

    def input_grad(self, x_dtype: torch.dtype, grads) -> torch.Tensor:
        """``dX = Σ G·W + dXA·A`` (one dequantised base weight alive at a time)."""
        dx = None
        for p, g in zip(self.projections, grads):
            base_dtype = p.base_dtype(x_dtype)
            dx = _accumulate_matmul(dx, g.to(base_dtype), p.dense_weight(base_dtype), x_dtype)
        if self.dxa_cat is not None:
            dx = _accumulate_matmul(dx, self.dxa_cat, self.a_cat, x_dtype)
        return dx

    def fill_a_grads(self, x2: torch.Tensor) -> list:
        """``dA = dXAᵀ·X`` for the adapters that need it; returns all adapter gradients."""
        if self.dxa_cat is not None and any(self.need[2 * i] for i in self.with_lora):
            da_cat = self.dxa_cat.t() @ x2.to(self.a_cat.dtype)
            ranks = [self.projections[i].lora_A.shape[0] for i in self.with_lora]
            for i, da in zip(self.with_lora, da_cat.split(ranks, dim=0)):
                if self.need[2 * i]:
                    self.grads[2 * i] = da
        return self.grads


def _accumulate_matmul(acc, a, b, dtype):
    """``acc + a @ b`` in ``dtype``: in place through ``addmm_`` when the dtypes allow (no
    temporary of the accumulator's size), else through a cast of the product."""
    if acc is None:
        product = a @ b
        return product if product.dtype == dtype else product.to(dtype)
    if a.dtype == b.dtype == acc.dtype and not torch.is_autocast_enabled(acc.device.type):
        return acc.addmm_(a, b)
    return acc.add_((a @ b).to(acc.dtype))


class _AutocastState:
    """The forward's autocast state, re-entered in backward (what ``torch.amp.custom_bwd`` does,
    for any device type)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _LoraProjectionsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projections, *adapters):
        projections = _with_adapters(projections, adapters)
        x2 = x.reshape(-1, x.shape[-1])
        outputs, xa_parts = _forward_projections(x2, projections)
        ctx.projections, ctx.xa_keys, ctx.x_shape = projections, tuple(xa_parts), x.shape
        ctx.autocast = _AutocastState(x.device.type)
        ctx.save_for_backward(x2, *xa_parts.values())  # saved-tensor hooks (offload, checkpoint) see all
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x2, *xa = ctx.saved_tensors
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        with ctx.autocast():
            adapter = _AdapterBackward(ctx.projections, dict(zip(ctx.xa_keys, xa)), grads, ctx.needs_input_grad[2:])
            dx = adapter.input_grad(x2.dtype, grads) if ctx.needs_input_grad[0] else None
            adapter_grads = adapter.fill_a_grads(x2)
        return (None if dx is None else dx.view(ctx.x_shape), None, *adapter_grads)


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projections, activation, *adapters):
        gate, up, down = _with_adapters(projections, adapters)
        x2 = x.reshape(-1, x.shape[-1])
        (g, u), xa_gate_up = _forward_projections(x2, (gate, up))
        h = gated_activation_forward(g, u, activation)
        (out,), xa_down = _forward_projections(h, (down,))
        ctx.projections, ctx.activation, ctx.x_shape = (gate, up, down), activation, x.shape
        ctx.xa_keys = (tuple(xa_gate_up), tuple(xa_down))
        ctx.autocast = _AutocastState(x.device.type)
        ctx.save_for_backward(x2, g, u, *xa_gate_up.values(), *xa_down.values())  # not h: recomputed
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, g, u, *xa = ctx.saved_tensors
        gate_up_keys, down_keys = ctx.xa_keys
        xa_gate_up, xa_down = dict(zip(gate_up_keys, xa)), dict(zip(down_keys, xa[len(gate_up_keys):]))
        gate, up, down = ctx.projections
        needs = ctx.needs_input_grad[3:]
        grad_out = [grad_out.reshape(-1, grad_out.shape[-1])]
        with ctx.autocast():
            down_adapter = _AdapterBackward((down,), xa_down, grad_out, needs[4:])
            dh = down_adapter.input_grad(g.dtype, grad_out)  # h = act(g)·u has the dtype of g
            need_h = down.has_lora and needs[4]
            dg, du, h = gated_activation_backward(dh, g, u, ctx.activation, need_out=need_h)
            down_grads = down_adapter.fill_a_grads(h) if need_h else down_adapter.grads
            gate_up_adapter = _AdapterBackward((gate, up), xa_gate_up, [dg, du], needs[:4])
            dx = gate_up_adapter.input_grad(x2.dtype, [dg, du]) if ctx.needs_input_grad[0] else None
            gate_up_grads = gate_up_adapter.fill_a_grads(x2)
        return (None if dx is None else dx.view(ctx.x_shape), None, None, *gate_up_grads, *down_grads)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _validate(x: torch.Tensor, projections) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}.")
    if not projections:
        raise ValueError("Give at least one Projection.")
    for p in projections:
        if not isinstance(p, Projection):
            raise TypeError(f"projections must be Projection objects, got {type(p).__name__}.")
        if p.in_features != x.shape[-1]:
            raise ValueError(f"x has {x.shape[-1]} features but a projection expects {p.in_features}.")
        if (p.lora_A is None) != (p.lora_B is None):
            raise ValueError("Give lora_A and lora_B together (or neither).")
        if p.has_lora and (p.lora_A.shape[1] != p.in_features or p.lora_B.shape != (p.out_features, p.lora_A.shape[0])):
            raise ValueError(
                f"LoRA shapes do not match the base weight: A {tuple(p.lora_A.shape)}, B {tuple(p.lora_B.shape)} "
                f"for a ({p.out_features}, {p.in_features}) weight.")
