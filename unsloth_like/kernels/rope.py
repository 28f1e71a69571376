"""Rotary position embedding on q and k in one launch: ``x * cos + rotate_half(x) * sin``.

Layout is Hugging Face's: q ``(batch, q_heads, seq, head_dim)`` and k ``(batch, kv_heads, seq,
head_dim)`` (any strides, e.g. the ``view(...).transpose(1, 2)`` views HF attention makes), with
the half-rotation convention (the first half of the rotary dims pairs with the second half).
GQA is just a different head count for k. When ``cos.shape[-1]`` is smaller than ``head_dim``
only the first ``rotary_dim`` channels rotate and the rest pass through (partial rotary).

``cos``/``sin`` come in one of two forms:

* already gathered per token, ``(seq, rotary_dim)`` or ``(batch | 1, seq, rotary_dim)`` — what
  HF's rotary embedding module returns;
* a table ``(max_positions, rotary_dim)`` together with ``position_ids`` ``(batch | 1, seq)``:
  the kernel gathers each token's row itself, so packed sequences (positions restarting inside
  a row) cost no extra gather. Positions must lie inside the table; on CUDA they are not checked
  (that would need a device sync), the reference raises an IndexError.

One program handles one token: all q heads and all k heads, reading that token's cos/sin row
once. Both halves of cos and sin are read, so the kernel is exact for any cos/sin, not only
HF's ``cat(freqs, freqs)`` layout. The backward pass is the transposed rotation, same kernel.

``inplace=True`` writes into q and k (saving two allocations, at the price of one launch per
tensor); use it only when nothing else needs the un-rotated values (true for fresh q/k
projections inside attention).
"""

from __future__ import annotations

import torch

from ._backend import Backend, register_op, select_backend
from ._common import check_float_tensor, check_same_device, tl, triton

register_op("apply_rope", "rotary embedding on q and k in one launch (GQA, partial rotary, position ids)")


def apply_rope_reference(q, k, cos, sin, position_ids=None, *, inplace: bool = False):
    """Pure-torch rotary embedding, numerically HF's ``apply_rotary_pos_emb``."""
    cos, sin = _per_token(cos, position_ids), _per_token(sin, position_ids)
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)  # HF casts to x's dtype
    rotary_dim = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        half = rotary_dim // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = x_rot * cos + rotated * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    q_out, k_out = rotate(q), rotate(k)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out


def _per_token(table: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """cos/sin as (batch | 1, seq, rotary_dim)."""
    if position_ids is None:
        return table if table.dim() == 3 else table.unsqueeze(0)
    positions = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    return table[positions]


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN, POS,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos, stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs, stride_pb, stride_ps,
    seq_len, n_q_heads, n_k_heads, half,
    HAS_POSITIONS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if HAS_POSITIONS:
        position = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
        row = position * stride_cs
    else:
        row = b * stride_cb + s * stride_cs
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    c1 = tl.load(COS + row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_QH)[:, None]
    q_mask = (hq < n_q_heads) & d_mask[None, :]
    q_in = Q + b * stride_qb + s * stride_qs + hq * stride_qh + d[None, :]
    q_out = Q_OUT + b * stride_qob + s * stride_qos + hq * stride_qoh + d[None, :]
    _rotate_tile(q_in, q_out, half, q_mask, c1, c2, s1, s2, BACKWARD)

    hk = tl.arange(0, BLOCK_KH)[:, None]
    k_mask = (hk < n_k_heads) & d_mask[None, :]
    k_in = K + b * stride_kb + s * stride_ks + hk * stride_kh + d[None, :]
    k_out = K_OUT + b * stride_kob + s * stride_kos + hk * stride_koh + d[None, :]
    _rotate_tile(k_in, k_out, half, k_mask, c1, c2, s1, s2, BACKWARD)


@triton.jit
def _rotate_tile(x_ptrs, out_ptrs, half, mask, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation below
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_ptrs, y1.to(out_ptrs.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + half, y2.to(out_ptrs.dtype.element_ty), mask=mask)


def _launch(q, k, q_out, k_out, cos, sin, position_ids, backward: bool) -> None:
    """Rotate q (and k, unless it is None) from the input tensors into the output tensors."""
    batch, n_q_heads, seq_len, _ = q.shape
    n_k_heads = 0 if k is None else k.shape[1]
    if k is None:  # a single tensor: the k half of the kernel is fully masked off
        k, k_out = q, q_out
    half = cos.shape[-1] // 2
    if position_ids is not None:
        positions = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        stride_pb = 0 if positions.shape[0] == 1 else positions.stride(0)
        stride_ps, stride_cb, stride_cs = positions.stride(1), 0, cos.stride(0)
    else:
        positions = cos  # unused pointer argument
        stride_pb = stride_ps = 0
        stride_cb = 0 if cos.dim() == 2 or cos.shape[0] == 1 else cos.stride(0)
        stride_cs = cos.stride(-2)
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin, positions,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        stride_cb, stride_cs, stride_pb, stride_ps,
        seq_len, n_q_heads, n_k_heads, half,
        HAS_POSITIONS=position_ids is not None, BACKWARD=backward,
        BLOCK_QH=triton.next_power_of_2(n_q_heads), BLOCK_KH=triton.next_power_of_2(max(n_k_heads, 1)),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def _rotated_copy(x, rotary_dim):
    """An output buffer for x's rotation; partial rotary's pass-through channels copied as is."""
    out = torch.empty_like(x)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


class _RopeFunction(torch.autograd.Function):
    """Out of place, q and k in one launch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q_out, k_out = _rotated_copy(q, cos.shape[-1]), _rotated_copy(k, cos.shape[-1])
        _launch(q, k, q_out, k_out, cos, sin, position_ids, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        # Autograd materialises a missing output gradient as zeros, so both are tensors here.
        cos, sin, position_ids = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dq_in, dk_in = _rotated_copy(dq, cos.shape[-1]), _rotated_copy(dk, cos.shape[-1])
        _launch(dq, dk, dq_in, dk_in, cos, sin, position_ids, backward=True)
        return dq_in, dk_in, None, None, None


class _RopeInplaceFunction(torch.autograd.Function):
    """In place on one tensor. Autograd cannot return two tensors from a Function that modifies
    views in place (and HF's q/k are views), so ``inplace=True`` launches once for q, once for k."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids):
        _launch(x, None, x, None, cos, sin, position_ids, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, position_ids)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin, position_ids = ctx.saved_tensors
        dx = dx if dx.stride(-1) == 1 else dx.contiguous()
        dx_in = _rotated_copy(dx, cos.shape[-1])
        _launch(dx, None, dx_in, None, cos, sin, position_ids, backward=True)
        return dx_in, None, None, None


def apply_rope(q, k, cos, sin, position_ids=None, *, inplace: bool = False):
    """Rotate q and k; returns ``(q_rotated, k_rotated)``. See the module docstring for layouts."""
    _validate(q, k, cos, sin, position_ids, inplace)
    if select_backend(q, k, cos, sin) is Backend.TORCH or q.numel() == 0:
        return apply_rope_reference(q, k, cos, sin, position_ids, inplace=inplace)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs q and k with contiguous last (head_dim) dimension.")
        q, k = q.contiguous(), k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if inplace:
        return (_RopeInplaceFunction.apply(q, cos, sin, position_ids),
                _RopeInplaceFunction.apply(k, cos, sin, position_ids))
    return _RopeFunction.apply(q, k, cos, sin, position_ids)


def _validate(q, k, cos, sin, position_ids, inplace) -> None:
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    check_float_tensor("cos", cos)
    check_float_tensor("sin", sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}."
        )
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}.")
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(
            f"k must have shape ({batch}, kv_heads, {seq}, {head_dim}) to match q {tuple(q.shape)}, got {tuple(k.shape)}."
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}.")
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"cos/sin last dimension (rotary_dim) must be even and in [2, {head_dim}], got {rotary_dim}.")
    if position_ids is None:
        ok = (cos.dim() == 2 and cos.shape[0] == seq) or (cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq)
        if not ok:
            raise ValueError(
                f"cos must have shape ({seq}, {rotary_dim}) or (1 or {batch}, {seq}, {rotary_dim}) "
                f"without position_ids, got {tuple(cos.shape)}."
            )
    else:
        if position_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"position_ids must be an int32/int64 tensor, got {position_ids.dtype}.")
        ok_shape = position_ids.shape in ((seq,), (1, seq), (batch, seq))
        if not ok_shape:
            raise ValueError(f"position_ids must have shape ({seq},), (1, {seq}) or ({batch}, {seq}), got {tuple(position_ids.shape)}.")
        if cos.dim() != 2:
            raise ValueError(f"with position_ids, cos/sin must be a (max_positions, rotary_dim) table, got {tuple(cos.shape)}.")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope does not differentiate cos/sin; pass them detached (HF computes them without grad).")
    if inplace and ((q.is_leaf and q.requires_grad) or (k.is_leaf and k.requires_grad)):
        raise ValueError("inplace=True cannot modify leaf tensors that require grad; use inplace=False.")
    check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
