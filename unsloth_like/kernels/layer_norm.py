"""LayerNorm over the last dimension (vision towers): ``(x - mean) * rstd * weight + bias``.

Statistics and the affine transform are computed in fp32 and the result is rounded once to the
input dtype, which is what ``torch.nn.functional.layer_norm`` does for 16-bit inputs. ``weight``
and ``bias`` are each optional (``elementwise_affine=False`` / ``bias=False`` modules) and may
be fp32 on 16-bit activations. Backward gives dx, dweight and dbias; like ``rms_norm``'s, each
backward program walks a run of rows and keeps its share of dweight/dbias in fp32 registers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Backend, register_op, select_backend
from ._common import backward_programs, check_float_tensor, check_same_device, check_shape, row_block_settings, tl, triton

register_op("layer_norm", "LayerNorm (optional weight/bias), grads for x, weight and bias")


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension; mixed dtypes are computed in fp32, rounded once."""
    shape = (x.shape[-1],)
    if all(t is None or t.dtype == x.dtype for t in (weight, bias)):
        return F.layer_norm(x, shape, weight, bias, eps)
    compute = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    return F.layer_norm(x.to(compute), shape, w, b, eps).to(x.dtype)


@triton.jit
def _layer_norm_forward_kernel(
    X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row64)
        rstd = tl.load(RSTD + row64)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            dw += dy * xhat
            dxhat = dy * w
        else:
            dxhat = dy
        if HAS_BIAS:
            db += dy
        c1 = tl.sum(dxhat * xhat, axis=0) / n_cols
        c2 = tl.sum(dxhat, axis=0) / n_cols
        dx = rstd * (dxhat - c2 - xhat * c1)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + program.to(tl.int64) * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + program.to(tl.int64) * n_cols + cols, db, mask=mask)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = row_block_settings(n_cols)
        _layer_norm_forward_kernel[(n_rows,)](
            x2, x2 if weight is None else weight, x2 if bias is None else bias, y, mean, rstd,
            x2.stride(0), y.stride(0), n_cols, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=num_warps,
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.bias_dtype, ctx.shape = bias is not None, None if bias is None else bias.dtype, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = backward_programs(x2.device, n_rows)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        db_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        block, num_warps = row_block_settings(n_cols)
        _layer_norm_backward_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, mean, rstd, dx, dw_partial, db_partial,
            dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
            HAS_WEIGHT=weight is not None, HAS_BIAS=ctx.has_bias, BLOCK=block, num_warps=num_warps,
        )
        dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = db_partial.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.view(ctx.shape), dweight, dbias, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape); weight and bias optional."""
    _validate(x, weight, bias, eps)
    tensors = [t for t in (x, weight, bias) if t is not None]
    if select_backend(*tensors) is Backend.TORCH or x.numel() == 0:
        return layer_norm_reference(x, weight, bias, eps)
    return _LayerNormFunction.apply(x, weight, bias, float(eps))


def _validate(x, weight, bias, eps) -> None:
    check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised), got a scalar.")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_float_tensor(name, tensor)
            check_shape(name, tensor, (x.shape[-1],), "one value per element of x's last dimension")
    check_same_device(x=x, weight=weight, bias=bias)
    if not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}.")
