"""Cross-entropy over a vocabulary, and the same loss straight from hidden states (fused lm_head).

``cross_entropy(logits, labels, ...)`` is ``torch.nn.functional.cross_entropy`` for language
models, plus what LM training needs on top:

* ``logit_scale`` ``s`` and ``softcap`` ``t`` (Gemma 2, Cohere): ``z = t * tanh(s * x / t)``,
  applied inside the kernel, gradients through both;
* ``label_smoothing`` ``eps`` as torch defines it: ``(1 - eps) * nll + eps * mean_v(-log p_v)``;
* ``ignore_index`` (any integer): such rows give 0 loss and 0 gradient;
* ``reduction="mean"`` divides by the number of non-ignored tokens, or by ``n_items`` when given
  (Hugging Face's ``num_items_in_batch``: the mean that stays correct under gradient
  accumulation). All rows ignored gives a loss of exactly 0 and zero gradients, never NaN.

The loss is always fp32 and everything is accumulated in fp32 whatever the logits dtype. The
kernel runs one program per row and walks the vocabulary in blocks of at most
``MAX_VOCAB_BLOCK`` columns with an online logsumexp, so 256K+ vocabularies need no row-sized
block. A second walk writes the gradient during the *forward* pass (Liger/Unsloth style), so
backward is a multiply by ``grad_output``.

Where the gradient goes: ``cross_entropy`` writes it into a separate buffer of the logits' shape
and dtype, never into ``logits`` (the caller still owns them, e.g. Hugging Face returns them in
the model output). ``fused_linear_cross_entropy`` writes it in place over each chunk's logits,
which it allocated itself and nobody else can see.

``fused_linear_cross_entropy(hidden, weight, labels, bias)`` computes the same loss as
``cross_entropy(hidden @ weight.T + bias, labels)`` without ever holding the (N, V) logits: it
walks the tokens in chunks (size from ``logits_chunk_rows``), and per chunk computes the logits
with a torch matmul, runs the cross-entropy (Triton kernel; on the TORCH backend, i.e. CPU, a
hand-written torch loss and gradient, ``_rows_torch``, with chunks of at least
``TORCH_MIN_CHUNK_ROWS`` rows so the matmuls run near the CPU's peak), then immediately turns
the chunk's dlogits into ``grad_hidden`` rows and adds its share of ``grad_weight``/``grad_bias``
(fp32 accumulators). Gradients are only computed for the tensors that require them (a frozen
lm_head, the LoRA case, never gets a ``grad_weight`` accumulator). For ``reduction="none"`` the
weight gradient depends on the per-token ``grad_output``, which the forward cannot know, so the
forward computes losses only and backward walks the chunks again.

Labels outside ``[0, V)`` that are not ``ignore_index`` are refused with a ``ValueError`` when
that can be checked without a device sync (CPU tensors); on a GPU the kernel gives those rows a
NaN loss rather than a silently wrong number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import Backend, register_op, select_backend
from ._common import FLOAT_DTYPES, check_float_tensor, check_same_device, check_shape, row_block_settings, tl, triton

register_op("cross_entropy", "Cross-entropy (vocab-chunked, softcap, logit scale, label smoothing, n_items mean)")
register_op(
    "fused_linear_cross_entropy",
    "lm_head matmul + cross-entropy in token chunks, never materialising the (N, V) logits",
)

REDUCTIONS = ("mean", "sum", "none")
# Widest slice of a row one program holds at a time; vocabularies beyond it are walked in blocks.
# 8192 columns (16 warps) is the widest block ptxas compiles without spilling registers on every
# architecture checked (sm_75 to sm_120): 32768 (32 warps, 64 registers a thread) spilled 200-600
# bytes a thread in every variant (``python -m unsloth_like.testing.triton_compile``). Walking the row in more blocks
# costs nothing for a kernel bound by memory bandwidth.
MAX_VOCAB_BLOCK = 8192
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Logits-chunk budget of fused_linear_cross_entropy, in bytes of fp32 logits (rows * V * 4).
# The step already holds ``hidden`` (N x H) and, when it trains, ``grad_hidden`` of the same size,
# so a chunk of a few times hidden's bytes adds a constant factor to memory the step needs anyway
# and never the N x V of full logits. The floor keeps chunks big enough for efficient matmuls and
# few launches when hidden is small; the ceiling stops long sequences from growing the chunk past
# the point where bigger matmuls gain anything.
CHUNK_BUDGET_FACTOR = 4
CHUNK_BUDGET_MIN = 16 * 2**20
CHUNK_BUDGET_MAX = 1 * 2**30
# On the TORCH backend (CPU) a chunk has at least TORCH_MIN_CHUNK_ROWS rows and at least a quarter of
# the tokens (up to CHUNK_BUDGET_MAX), because the lm_head matmuls are most of a CPU step at real
# vocabularies and run well below their peak on short chunks. Measured on a 2-core AVX512 Xeon,
# H 576, logits plus grad_hidden matmuls: 206 GFLOP/s at 32 rows, 309 at 128, 320 at 256 (V 128256);
# 318 at 256, 349 at 512, 365 at 1024 rows (V 262144: each chunk streams the whole weight again).
# A quarter of the tokens keeps the chunk's logits at a quarter of one of the (N, V) buffers that
# unfused logits need three of.
TORCH_MIN_CHUNK_ROWS = 256
TORCH_CHUNK_TOKEN_SHARE = 4
# The TORCH backend's cross-entropy walks a chunk in blocks of rows of about this many bytes, so each
# of its passes over a block runs in a core's L2 cache.
TORCH_BLOCK_BYTES = 2 * 2**20


# --------------------------------------------------------------------------------------------
# Torch reference (CPU path and test oracle)
# --------------------------------------------------------------------------------------------


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    n_items=None,
) -> torch.Tensor:
    """Pure-torch cross-entropy with the same signature and numerics as ``cross_entropy``."""
    _validate_options(ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items)
    _validate_logits(logits, labels, ignore_index, allow_float64=True)
    return _reference(logits, labels, ignore_index, softcap, logit_scale, label_smoothing, reduction,
                      _n_items_tensor(n_items, logits.device))


def _reference(logits, labels, ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items):
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    loss = _reference_rows(logits.reshape(-1, vocab), flat_labels, ignore_index, softcap, logit_scale, label_smoothing)
    return _reduce(loss, flat_labels, labels.shape, ignore_index, reduction, n_items)


def _reference_rows(logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing):
    """Per-row losses (ignored rows 0), computed in fp32 (fp64 stays fp64 for gradcheck)."""
    compute = torch.promote_types(logits2d.dtype, torch.float32)
    z = logits2d.to(compute)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    keep = labels1d != ignore_index
    safe = torch.where(keep, labels1d, torch.zeros_like(labels1d)).long()
    loss = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * logp.mean(-1)
    return torch.where(keep, loss, torch.zeros_like(loss))


def _reduce(loss_rows, labels1d, labels_shape, ignore_index, reduction, n_items):
    if reduction == "none":
        return loss_rows.view(labels_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / _mean_denominator(labels1d, ignore_index, n_items).to(total.dtype)


def _mean_denominator(labels1d, ignore_index, n_items):
    """``n_items`` if given, else the count of non-ignored labels (at least 1: all ignored -> 0)."""
    if n_items is not None:
        return n_items
    return (labels1d != ignore_index).sum().clamp_min(1).to(torch.float32)


def _grad_scale(labels1d, ignore_index, reduction, n_items):
    """d(reduced loss)/d(row loss) as a 1-element fp32 tensor (kept on device: no sync)."""
    if reduction == "mean":
        return (1.0 / _mean_denominator(labels1d, ignore_index, n_items)).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=labels1d.device)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh_sech2(a):
    """(tanh(a), 1 - tanh(a)**2), both accurate to a few ulps over the whole range.

    tl has no tanh (libdevice's returns None in the interpreter). With e = exp(-2|a|):
    tanh = sign(a) (1 - e) / (1 + e), except near 0 where that cancels and a short odd Taylor
    series is used; and 1 - tanh**2 = 4e / (1 + e)**2, which keeps its precision where tanh
    saturates (1 - tanh**2 itself would cancel to a few bits: strong softcaps live there).
    """
    e = tl.exp(-2.0 * tl.abs(a))
    one_e = 1.0 + e
    far = (1.0 - e) / one_e
    far = tl.where(a < 0.0, -far, far)
    a2 = a * a
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    return tl.where(tl.abs(a) < 0.2, series, far), 4.0 * e / (one_e * one_e)


@triton.jit
def _cross_entropy_kernel(
    X, Y, DX, LOSS, GRAD_SCALE, stride_x, stride_dx, n_cols, ignore_index,
    logit_scale, softcap, label_smoothing,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    label = tl.load(Y + row).to(tl.int64)
    offsets = tl.arange(0, BLOCK)

    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                tl.store(dx_row + cols, tl.zeros((BLOCK,), dtype=tl.float32).to(DX.dtype.element_ty),
                         mask=cols < n_cols)
        return

    # Walk 1: online logsumexp, the label's logit and (for smoothing) the sum of all logits.
    m = float("-inf")
    d = 0.0
    z_label = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            th, _ = _tanh_sech2(z / softcap)
            z = softcap * th
        z_live = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_live, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z_live - m_new), axis=0)
        m = m_new
        z_label += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(d)
    loss = lse - z_label
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / n_cols)
    in_range = (label >= 0) & (label < n_cols)
    tl.store(LOSS + row, tl.where(in_range, loss, float("nan")))

    # Walk 2: dloss/dx = (softmax - (1-eps) onehot - eps/V) * dz/dx, times d(reduced)/d(row).
    if COMPUTE_GRAD:
        if PER_ROW_SCALE:
            scale = tl.load(GRAD_SCALE + row)
        else:
            scale = tl.load(GRAD_SCALE)
        on_label = 1.0 - label_smoothing
        uniform = label_smoothing / n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                z = z * logit_scale
            if HAS_SOFTCAP:
                th, sech2 = _tanh_sech2(z / softcap)
                z = softcap * th
            g = tl.exp(z - lse) - tl.where(cols == label, on_label, 0.0)
            if HAS_SMOOTHING:
                g = g - uniform
            if HAS_SOFTCAP:
                g = g * sech2
            if HAS_SCALE:
                g = g * logit_scale
            tl.store(dx_row + cols, (g * scale).to(DX.dtype.element_ty), mask=mask)


def _vocab_block_settings(n_cols: int) -> tuple[int, int]:
    return row_block_settings(min(n_cols, MAX_VOCAB_BLOCK))


def _rows_triton(logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing,
                 grad_scale, per_row_scale, compute_grad, grad_into_logits):
    """Per-row fp32 losses and (if ``compute_grad``) dlogits from the Triton kernel.

    ``grad_into_logits`` overwrites ``logits2d`` with its gradient (only for buffers the caller
    owns outright); otherwise the gradient gets a fresh buffer.
    """
    n_rows, n_cols = logits2d.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    if compute_grad:
        dx = logits2d if grad_into_logits else torch.empty_like(logits2d)
    else:
        dx = logits2d  # never written: COMPUTE_GRAD=False
    block, num_warps = _vocab_block_settings(n_cols)
    _cross_entropy_kernel[(n_rows,)](
        logits2d, labels1d, dx, loss, grad_scale, logits2d.stride(0), dx.stride(0), n_cols, int(ignore_index),
        float(logit_scale if logit_scale is not None else 1.0), float(softcap if softcap is not None else 1.0),
        float(label_smoothing),
        HAS_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0,
        PER_ROW_SCALE=per_row_scale, COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps,
    )
    return loss, (dx if compute_grad else None)


def _rows_torch(logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing,
                grad_scale, per_row_scale, compute_grad):
    """The same as ``_rows_triton`` in torch, for the TORCH backend (CPU), without autograd.

    Overwrites ``logits2d`` (a chunk the caller owns) with its gradient. The softmax is taken once
    and in place, ``TORCH_BLOCK_BYTES`` of rows at a time so that its passes (max, exp, sum, scale)
    run in cache: log_softmax and its autograd backward would take the exponential twice and make
    three more (rows, V) buffers (log-probabilities, the gathered gradient's zeros, the gradient).
    Half logits are worked on in an fp32 copy of one block at a time, the gradient written back.
    """
    n_rows, vocab = logits2d.shape
    keep = labels1d != ignore_index
    safe = torch.where(keep, labels1d, torch.zeros_like(labels1d)).long().unsqueeze(1)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    weights = None
    if compute_grad:
        weights = (grad_scale if per_row_scale else grad_scale.expand(n_rows)).to(torch.float32)
        weights = torch.where(keep, weights, torch.zeros_like(weights)).unsqueeze(1)
    block = max(1, TORCH_BLOCK_BYTES // (vocab * 4))
    for start in range(0, n_rows, block):
        rows = slice(start, min(n_rows, start + block))
        z = logits2d[rows] if logits2d.dtype == torch.float32 else logits2d[rows].float()
        loss[rows] = _block_loss_and_grad(z, safe[rows], keep[rows], softcap, logit_scale, label_smoothing,
                                          None if weights is None else weights[rows])
        if compute_grad and z.dtype != logits2d.dtype:
            logits2d[rows].copy_(z)
    return loss, (logits2d if compute_grad else None)


def _block_loss_and_grad(z, labels, keep, softcap, logit_scale, label_smoothing, weights):
    """Losses of the rows of ``z`` (fp32, overwritten); with ``weights`` (rows, 1: dloss/drow, 0 for
    ignored rows) ``z`` ends up holding their gradient with respect to the raw logits."""
    if logit_scale is not None:
        z.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        torch.mul(tanh, softcap, out=z)
    label_logit = z.gather(1, labels).squeeze(1)
    mean_logit = z.mean(1) if label_smoothing else None
    row_max = z.amax(1, keepdim=True)
    z.sub_(row_max).exp_()
    total = z.sum(1, keepdim=True)
    lse = (row_max + total.log()).squeeze(1)
    loss = lse - label_logit
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if weights is None:
        return loss
    # d loss / d z = softmax - (1 - eps) onehot(label) - eps / V, times the row's weight.
    z.mul_(weights / total)
    if label_smoothing:
        z.sub_(weights * (label_smoothing / z.shape[1]))
    z.scatter_add_(1, labels, -(1.0 - label_smoothing) * weights)
    if tanh is not None:  # z = c tanh(u / c): dz/du = 1 - tanh^2
        z.mul_(1.0 - tanh * tanh)
    if logit_scale is not None:
        z.mul_(logit_scale)
    return loss


def _ce_rows(backend, logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing,
             grad_scale, per_row_scale, compute_grad, grad_into_logits=False):
    if backend is Backend.TORCH:  # always overwrites the chunk: only ever called on chunks we own
        return _rows_torch(logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing,
                           grad_scale, per_row_scale, compute_grad)
    return _rows_triton(logits2d, labels1d, ignore_index, softcap, logit_scale, label_smoothing,
                        grad_scale, per_row_scale, compute_grad, grad_into_logits)


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


def _once(ctx, op: str) -> None:
    # The saved gradients are scaled by grad_output in place (no second N x V buffer), so a second
    # backward through the same graph would scale them twice: refuse it instead.
    if getattr(ctx, "done", False):
        raise RuntimeError(
            f"{op} computes its gradient in the forward pass and scales it in place in backward; "
            "backward through it twice (retain_graph=True) is not supported."
        )
    ctx.done = True


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items,
                compute_grad):
        vocab = logits.shape[-1]
        x2 = logits.reshape(-1, vocab)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = labels.reshape(-1).contiguous()
        grad_scale = _grad_scale(y, ignore_index, reduction, n_items)
        loss_rows, dx = _rows_triton(x2, y, ignore_index, softcap, logit_scale, label_smoothing,
                                     grad_scale, False, compute_grad, grad_into_logits=False)
        if compute_grad:
            ctx.save_for_backward(dx)
        ctx.shape, ctx.reduction = logits.shape, reduction
        return _reduce(loss_rows, y, labels.shape, ignore_index, reduction, n_items)

    @staticmethod
    def backward(ctx, grad_out):
        _once(ctx, "cross_entropy")
        (dx,) = ctx.saved_tensors
        dx.mul_(grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out)
        return dx.view(ctx.shape), None, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    n_items=None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``labels`` (...); see the module docstring.

    Returns an fp32 scalar (``"mean"``/``"sum"``) or fp32 per-token losses of ``labels``' shape
    (``"none"``). The gradient has the logits' dtype and lives in its own buffer.
    """
    _validate_options(ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items)
    _validate_logits(logits, labels, ignore_index)
    n_items = _n_items_tensor(n_items, logits.device)
    if select_backend(logits, labels) is Backend.TORCH or logits.numel() == 0:
        return _reference(logits, labels, ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropyFunction.apply(
        logits, labels, int(ignore_index), _opt_float(softcap), _opt_float(logit_scale), float(label_smoothing),
        reduction, n_items, compute_grad,
    )


# --------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# --------------------------------------------------------------------------------------------


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    n_items=None,
) -> torch.Tensor:
    """``cross_entropy_reference(hidden @ weight.T + bias, labels, ...)``: full logits, the oracle."""
    _validate_options(ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items)
    _validate_linear(hidden, weight, labels, bias, ignore_index, allow_float64=True)
    return _reference(F.linear(hidden, weight, bias), labels, ignore_index, softcap, logit_scale, label_smoothing,
                      reduction, _n_items_tensor(n_items, hidden.device))


def logits_chunk_rows(n_rows: int, vocab: int, hidden_bytes: int, chunk_bytes: int | None = None,
                      min_rows: int = 1) -> int:
    """Token rows per chunk so one chunk's fp32 logits (rows * vocab * 4 bytes) fit the budget.

    The budget is ``chunk_bytes`` when given, else ``CHUNK_BUDGET_FACTOR`` x hidden's bytes clamped
    to [``CHUNK_BUDGET_MIN``, ``CHUNK_BUDGET_MAX``] (see their comment), and then at least
    ``min_rows`` rows (``TORCH_MIN_CHUNK_ROWS`` on CPU). At least one row, at most ``n_rows``.
    """
    if chunk_bytes is not None:
        return max(1, min(n_rows, chunk_bytes // (vocab * 4)))
    budget = min(max(CHUNK_BUDGET_FACTOR * hidden_bytes, CHUNK_BUDGET_MIN), CHUNK_BUDGET_MAX)
    return max(1, min(n_rows, max(budget // (vocab * 4), min_rows)))


def torch_min_chunk_rows(n_rows: int, vocab: int) -> int:
    """The TORCH backend's floor on rows per chunk (see ``TORCH_MIN_CHUNK_ROWS``)."""
    return max(TORCH_MIN_CHUNK_ROWS, min(-(-n_rows // TORCH_CHUNK_TOKEN_SHARE), CHUNK_BUDGET_MAX // (vocab * 4)))


def _fused_chunks(backend, h2, weight, bias, labels1d, opts, grad_scale, per_row_scale, need_h, need_w, need_b,
                  want_loss, chunk_rows):
    """Walk the tokens in chunks: logits -> CE (loss, dlogits) -> grad rows/accumulators."""
    n_rows = h2.shape[0]
    compute_grad = need_h or need_w or need_b
    loss = torch.empty(n_rows, dtype=torch.float32, device=h2.device) if want_loss else None
    grad_h = torch.empty_like(h2, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h2.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h2.device) if need_b else None
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        h_chunk = h2[start:end]
        logits = F.linear(h_chunk, weight, bias)  # (rows, V) in the compute dtype, fp32 accumulation
        scale = grad_scale[start:end] if per_row_scale else grad_scale
        loss_chunk, dlogits = _ce_rows(backend, logits, labels1d[start:end], *opts, scale, per_row_scale,
                                       compute_grad, grad_into_logits=True)
        if want_loss:
            loss[start:end] = loss_chunk
        if need_h:
            torch.mm(dlogits, weight, out=grad_h[start:end])
        if need_w:
            if dlogits.dtype == torch.float32:
                grad_w.addmm_(dlogits.t(), h_chunk)
            else:  # half matmul (fp32 accumulation inside), one rounding per chunk, fp32 sum across chunks
                grad_w.add_(torch.mm(dlogits.t(), h_chunk))
        if need_b:
            grad_b.add_(dlogits.sum(0, dtype=torch.float32))
        del logits, dlogits, loss_chunk
    return loss, grad_h, grad_w, grad_b


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing, reduction,
                n_items, need_h, need_w, need_b, chunk_bytes, backend):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).contiguous()
        chunk_rows = logits_chunk_rows(h2.shape[0], weight.shape[0], hidden.numel() * hidden.element_size(),
                                       chunk_bytes, torch_min_chunk_rows(h2.shape[0], weight.shape[0])
                                       if backend is Backend.TORCH else 1)
        opts = (ignore_index, softcap, logit_scale, label_smoothing)
        ctx.hidden_shape, ctx.reduction, ctx.backend, ctx.chunk_rows, ctx.opts = (
            hidden.shape, reduction, backend, chunk_rows, opts)
        ctx.needs = (need_h, need_w, need_b)
        if reduction == "none":
            # grad_weight needs the per-token grad_output: losses now, gradients in backward.
            loss, _, _, _ = _fused_chunks(backend, h2, weight, bias, y, opts, None, False, False, False, False,
                                          True, chunk_rows)
            if need_h or need_w or need_b:
                ctx.save_for_backward(h2, weight, bias, y)
            return loss.view(labels.shape)
        grad_scale = _grad_scale(y, ignore_index, reduction, n_items)
        loss, grad_h, grad_w, grad_b = _fused_chunks(backend, h2, weight, bias, y, opts, grad_scale, False,
                                                     need_h, need_w, need_b, True, chunk_rows)
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return _reduce(loss, y, labels.shape, ignore_index, reduction, n_items)

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w, need_b = ctx.needs
        if ctx.reduction == "none":
            h2, weight, bias, y = ctx.saved_tensors
            scale = grad_out.reshape(-1).to(torch.float32).contiguous()
            _, grad_h, grad_w, grad_b = _fused_chunks(ctx.backend, h2, weight, bias, y, ctx.opts, scale, True,
                                                      need_h, need_w, need_b, False, ctx.chunk_rows)
            grad_w = grad_w.to(weight.dtype) if need_w else None
            grad_b = grad_b.to(bias.dtype) if need_b else None
        else:
            _once(ctx, "fused_linear_cross_entropy")
            grad_h, grad_w, grad_b = ctx.saved_tensors
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    grad.mul_(grad_out)
        grad_h = grad_h.view(ctx.hidden_shape) if need_h else None
        return (grad_h, grad_w, grad_b) + (None,) * 12


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    n_items=None,
    *,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the (N, V) logits.

    ``hidden`` (..., H), ``weight`` (V, H) (the lm_head), ``bias`` (V,) or None, ``labels`` (...).
    ``chunk_bytes`` overrides the fp32 logits budget per chunk (see ``logits_chunk_rows``).
    """
    _validate_options(ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items)
    _validate_linear(hidden, weight, labels, bias, ignore_index)
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive integer number of bytes, got {chunk_bytes!r}.")
    n_items = _n_items_tensor(n_items, hidden.device)
    backend = select_backend(hidden, weight, labels, *([bias] if bias is not None else []))
    if hidden.numel() == 0:
        return _reference(F.linear(hidden, weight, bias), labels, ignore_index, softcap, logit_scale,
                          label_smoothing, reduction, n_items)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    return _FusedLinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, int(ignore_index), _opt_float(softcap), _opt_float(logit_scale),
        float(label_smoothing), reduction, n_items, need_h, need_w, need_b, chunk_bytes, backend,
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _opt_float(value):
    return None if value is None else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_labels(labels, lead_shape, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"labels must be an integer tensor (token ids, e.g. torch.int64), got {labels.dtype}.")
    if tuple(labels.shape) != tuple(lead_shape):
        shown = "(" + ", ".join(str(s) for s in lead_shape) + ")"
        raise ValueError(f"labels must have shape {shown} ({what}), got {tuple(labels.shape)}.")


def _check_label_range(labels, vocab: int, ignore_index) -> None:
    """Labels in [0, V) or == ignore_index; only where it costs no device sync (CPU tensors)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    live = labels[labels != ignore_index]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab):
        raise ValueError(
            f"labels must be token ids in [0, {vocab}) or ignore_index={ignore_index}, "
            f"got values in [{int(live.min())}, {int(live.max())}]."
        )


def _validate_logits(logits, labels, ignore_index, allow_float64: bool = False) -> None:
    check_float_tensor("logits", logits, FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ()))
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with a non-empty vocabulary dimension last, "
                         f"got {tuple(logits.shape)}.")
    _check_labels(labels, logits.shape[:-1], "one token id per row of logits, i.e. logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    _check_label_range(labels, logits.shape[-1], ignore_index)


def _validate_linear(hidden, weight, labels, bias, ignore_index, allow_float64: bool = False) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_float_tensor("hidden", hidden, dtypes)
    check_float_tensor("weight", weight, dtypes)
    if hidden.dim() == 0:
        raise ValueError("hidden must have shape (..., H) with the hidden size last, got a scalar.")
    check_shape("weight", weight, (None, hidden.shape[-1]), "(V, H): the lm_head weight, H = hidden.shape[-1]")
    if weight.shape[0] == 0:
        raise ValueError("weight must have shape (V, H) with V >= 1 (the vocabulary), got V = 0.")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype} (the matmul runs in it), got {weight.dtype}.")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}.")
        check_shape("bias", bias, (weight.shape[0],), "(V,): one per row of weight")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}.")
    _check_labels(labels, hidden.shape[:-1], "one token id per row of hidden, i.e. hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _check_label_range(labels, weight.shape[0], ignore_index)


def _validate_options(ignore_index, softcap, logit_scale, label_smoothing, reduction, n_items) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}.")
    if softcap is not None and not (_is_number(softcap) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}.")
    if logit_scale is not None and not (_is_number(logit_scale) and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be None or a finite number, got {logit_scale!r}.")
    if not (_is_number(label_smoothing) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if n_items is not None and reduction != "mean":
        raise ValueError(f"n_items is the divisor of reduction='mean'; it cannot be used with reduction={reduction!r}.")
    if n_items is None:
        return
    if isinstance(n_items, torch.Tensor):
        if n_items.numel() != 1 or n_items.dtype.is_complex or n_items.dtype == torch.bool:
            raise ValueError(f"n_items must be a positive number or a one-element tensor, got shape "
                             f"{tuple(n_items.shape)} dtype {n_items.dtype}.")
        value = float(n_items.item())  # one sync: a zero or negative divisor must not pass silently
    elif _is_number(n_items):
        value = float(n_items)
    else:
        raise ValueError(f"n_items must be a positive number or a one-element tensor, got {type(n_items).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"n_items must be > 0 (the number of target tokens in the batch), got {value!r}.")


def _n_items_tensor(n_items, device):
    if n_items is None:
        return None
    if isinstance(n_items, torch.Tensor):
        return n_items.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(n_items), dtype=torch.float32, device=device)
