"""RMSNorm: ``x * rsqrt(mean(x**2) + eps) * (weight + offset)`` with gradients for x and weight.

Two cast orders, both matching Hugging Face bit for bit in the reference:

* ``"llama"`` (Llama, Mistral, Qwen2/3 and most others): normalise in fp32, cast the normalised
  value back to the input dtype, then multiply by the weight. The output dtype is the promotion
  of input and weight dtypes (an fp32 weight on bf16 activations gives fp32, as in HF).
* ``"gemma"`` (``offset=1.0``): everything in fp32, ``(1 + weight)``, one cast to the input dtype.

The default ``cast_mode`` follows ``offset``: 0 -> llama, anything else -> gemma.

Statistics are always fp32. The kernels keep one row per program in the forward and let each
backward program walk a run of rows, accumulating its share of ``dweight`` in fp32 registers
(partial sums are added up once at the end), so ``dweight`` costs no atomics.
"""

from __future__ import annotations

import torch

from ._backend import Backend, register_op, select_backend
from ._common import backward_programs, check_float_tensor, check_same_device, check_shape, row_block_settings, tl, triton

register_op("rms_norm", "RMSNorm (Llama/Gemma cast orders), grads for x and weight")

CAST_MODES = ("llama", "gemma")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, *, cast_mode: str | None = None
) -> torch.Tensor:
    """Pure-torch RMSNorm with the same signature and numerics (the CPU path and test oracle)."""
    mode = _resolve_cast_mode(cast_mode, offset)
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics (fp64 stays fp64 for gradcheck)
    x32 = x.to(compute)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "gemma":
        return (normed * (weight.to(compute) + offset)).to(x.dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if offset == 0.0:
        return weight.to(out_dtype) * normed.to(x.dtype).to(out_dtype)  # exactly HF's LlamaRMSNorm
    return ((weight.to(compute) + offset) * normed.to(x.dtype).to(compute)).to(out_dtype)


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset,
    GEMMA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = x * rstd
    if not GEMMA:
        normed = normed.to(X.dtype.element_ty).to(tl.float32)  # HF Llama rounds before the weight
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
    rows_per_program, GEMMA: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        normed = x * rstd
        if GEMMA:
            dw += dy * normed
        else:
            dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
        dnormed = dy * w
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program.to(tl.int64) * n_cols + cols, dw, mask=mask)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        weight = weight.contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = row_block_settings(n_cols)
        _rms_norm_forward_kernel[(n_rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, offset,
            GEMMA=gemma, BLOCK=block, num_warps=num_warps,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.gemma, ctx.shape = offset, gemma, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = backward_programs(x2.device, n_rows)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        block, num_warps = row_block_settings(n_cols)
        _rms_norm_backward_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, ctx.offset, triton.cdiv(n_rows, programs),
            GEMMA=ctx.gemma, BLOCK=block, num_warps=num_warps,
        )
        dweight = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dweight, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, *, cast_mode: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape); see the module docstring."""
    mode = _resolve_cast_mode(cast_mode, offset)
    _validate(x, weight, eps)
    if select_backend(x, weight) is Backend.TORCH or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset, cast_mode=mode)
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), mode == "gemma")


def _resolve_cast_mode(cast_mode: str | None, offset: float) -> str:
    if cast_mode is None:
        return "llama" if offset == 0.0 else "gemma"
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}.")
    return cast_mode


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised), got a scalar.")
    check_shape("weight", weight, (x.shape[-1],), "one scale per element of x's last dimension")
    check_same_device(x=x, weight=weight)
    if not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}.")
