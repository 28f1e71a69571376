"""cross_entropy / fused_linear_cross_entropy: Triton kernel (interpreted on CPU) vs torch reference.

Oracles. For the plain cross-entropy the oracle is ``cross_entropy_reference`` evaluated in
float64 on the very same (dtype-rounded) logits: over 256K columns torch's own fp32 log_softmax
carries ~1e-6 of relative error (measured here: 2.9e-5 absolute on a loss of 19, 3e-6 norm-wise
on the gradient), more than the kernel's, so an fp32 oracle would test torch, not us. Losses are
fp32 outputs (fp32 tolerance); gradients have the logits' dtype and are compared norm-wise with
that dtype's tolerance against the oracle's gradient. The fused linear CE is compared with the
unfused op on the same inputs (same matmul dtype), as the brief asks.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

from unsloth_like.kernels import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    use_backend,
)
from unsloth_like.kernels._backend import Backend, select_backend

from .tolerances import assert_close_dtype, assert_close_normwise

ce_module = importlib.import_module("unsloth_like.kernels.cross_entropy")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(
    select_backend(torch.ones(1)) is Backend.TORCH and not torch.cuda.is_available(),
    reason="needs Triton (interpreter on CPU or a CUDA device)",
)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _logits(rows, vocab, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype).to(_device())


def _labels(rows, vocab, seed=0, ignore_index=-100, n_ignored=1):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.randperm(rows, generator=g)[:n_ignored]] = ignore_index
    return labels.to(_device())


def _loss_and_grad(fn, logits, labels, dy=0.75, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, **kwargs)
    if loss.dim() == 0:
        (loss * dy).backward()
    else:
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape))
    return loss.detach(), x.grad


def _check_against_oracle(logits, labels, **kwargs):
    loss, grad = _loss_and_grad(cross_entropy, logits, labels, **kwargs)
    loss64, grad64 = _loss_and_grad(cross_entropy_reference, logits.double(), labels, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_dtype(loss, loss64.float())
    assert_close_normwise(grad, grad64.to(logits.dtype), logits.dtype)


# ---------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab, rows", [(32003, 6), (151936, 4), (262144, 3), (1, 5), (7, 9), (1000, 17)])
def test_forward_and_gradient_match_reference(vocab, rows, dtype):
    logits = _logits(rows, vocab, dtype)
    labels = _labels(rows, vocab, n_ignored=1 if rows > 3 else 0)
    _check_against_oracle(logits, labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        dict(softcap=30.0),
        dict(softcap=2.0),  # strong capping: most logits in tanh's curved part
        dict(logit_scale=0.125),
        dict(logit_scale=-1.5),
        dict(label_smoothing=0.1),
        dict(softcap=15.0, logit_scale=2.0, label_smoothing=0.2),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_softcap_scale_smoothing_match_reference(options, dtype, monkeypatch):
    # Several vocab blocks per row and a ragged tail (the interpreter pays ~3 ms per block step).
    monkeypatch.setattr(ce_module, "MAX_VOCAB_BLOCK", 512)
    logits = _logits(5, 1999, dtype, seed=3, scale=8.0)
    _check_against_oracle(logits, _labels(5, 1999, seed=3, n_ignored=1), **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_and_n_items(reduction, dtype):
    logits = _logits(2 * 9, 3001, dtype, seed=5).view(2, 9, 3001)  # (batch, seq, V)
    labels = _labels(18, 3001, seed=5, n_ignored=5).view(2, 9)
    _check_against_oracle(logits, labels, reduction=reduction)
    if reduction == "mean":
        _check_against_oracle(logits, labels, n_items=37)
        _check_against_oracle(logits, labels, n_items=torch.tensor(12, device=logits.device))
        loss = cross_entropy(logits, labels, n_items=37)
        assert_close_dtype(loss, cross_entropy(logits, labels, reduction="sum") / 37)
    if reduction == "none":
        assert cross_entropy(logits, labels, reduction="none").shape == (2, 9)


@pytest.mark.parametrize("ignore_index", [-1, 7, 2**40])
def test_custom_ignore_index(ignore_index):
    vocab, rows = 500, 12
    logits = _logits(rows, vocab, torch.float32, seed=9)
    labels = _labels(rows, vocab, seed=9, ignore_index=ignore_index, n_ignored=4)
    if ignore_index == 7:
        labels[0] = 7  # a real class id used as the ignore value
    if ignore_index == -1:
        labels = labels.to(torch.int32)  # any integer dtype of token ids
    loss, grad = _loss_and_grad(cross_entropy, logits, labels, reduction="none", ignore_index=ignore_index)
    ignored = labels == ignore_index
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert (loss[~ignored] > 0).all()
    _check_against_oracle(logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_labels_ignored_gives_zero_not_nan(reduction, dtype):
    logits = _logits(6, 700, dtype, seed=2)
    labels = torch.full((6,), -100, device=logits.device)
    for fn in (cross_entropy, cross_entropy_reference):
        loss, grad = _loss_and_grad(fn, logits, labels, reduction=reduction)
        assert (loss == 0).all() and (grad == 0).all(), fn.__name__
    hidden = torch.randn(6, 16, dtype=dtype, device=logits.device, requires_grad=True)
    weight = torch.randn(700, 16, dtype=dtype, device=logits.device, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_reference_matches_torch_cross_entropy():
    logits = _logits(2 * 10, 257, torch.float32, seed=4).view(2, 10, 257)
    labels = _labels(20, 257, seed=4, n_ignored=6).view(2, 10)
    flat, flat_labels = logits.reshape(-1, 257), labels.reshape(-1)
    for reduction in ("mean", "sum", "none"):
        for eps in (0.0, 0.1):
            ours = cross_entropy_reference(logits, labels, reduction=reduction, label_smoothing=eps)
            torch_loss = F.cross_entropy(flat, flat_labels, reduction=reduction, label_smoothing=eps)
            torch.testing.assert_close(ours.reshape(-1), torch_loss.reshape(-1), rtol=2e-7, atol=0.0)
    labels5 = labels.masked_fill(labels == -100, 5)
    ours = cross_entropy_reference(logits, labels5, logit_scale=0.3, ignore_index=5)
    torch_loss = F.cross_entropy(flat * 0.3, labels5.reshape(-1), ignore_index=5)
    torch.testing.assert_close(ours, torch_loss, rtol=2e-7, atol=0.0)
    # Hugging Face's loss with num_items_in_batch: sum over tokens / num_items.
    ours = cross_entropy_reference(logits, labels, n_items=torch.tensor(13))
    torch.testing.assert_close(ours, F.cross_entropy(flat, flat_labels, reduction="sum") / 13, rtol=2e-7, atol=0.0)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 6])
    for kwargs in (
        dict(softcap=1.5, logit_scale=0.7, label_smoothing=0.2),
        dict(reduction="none", softcap=3.0),
        dict(reduction="sum", label_smoothing=0.3, n_items=None),
        dict(n_items=9, logit_scale=-2.0),
    ):
        assert torch.autograd.gradcheck(lambda a: cross_entropy_reference(a, labels, **kwargs), (x,)), kwargs
    h = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: fused_linear_cross_entropy_reference(h_, w_, labels, b_, softcap=2.0), (h, w, b)
    )


def test_non_contiguous_logits_and_no_grad():
    logits = _logits(6 * 5, 301, torch.float32, seed=6).view(5, 6, 301).transpose(0, 1)  # not contiguous
    labels = _labels(30, 301, seed=6, n_ignored=4).view(6, 5)
    _check_against_oracle(logits, labels)
    with torch.no_grad():
        x = logits.clone().requires_grad_(True)
        loss = cross_entropy(x, labels)
    assert not loss.requires_grad
    assert_close_dtype(loss, cross_entropy_reference(logits.double(), labels).float())


def test_logits_are_not_overwritten_and_double_backward_is_refused():
    logits = _logits(4, 300, torch.bfloat16, seed=8).requires_grad_(True)
    before = logits.detach().clone()
    loss = cross_entropy(logits, _labels(4, 300, seed=8))
    assert torch.equal(logits.detach(), before)
    loss.backward(retain_graph=True)
    assert torch.equal(logits.detach(), before)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_kernel_gives_nan_for_out_of_range_labels():
    # On GPU labels are not range-checked (that needs a sync): the kernel must not return a
    # plausible number for such rows. Called below validation, since CPU input is refused earlier.
    logits = _logits(3, 100, torch.float32)
    labels = torch.tensor([5, 100, -3])
    one = torch.ones(1)
    loss, _ = ce_module._rows_triton(logits, labels, -100, None, None, 0.0, one, False, False, False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


# --------------------------------------------------------------- fused_linear_cross_entropy


def _linear_inputs(n, h, vocab, dtype, seed=0, bias=True, n_ignored=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(_device())
    weight = (torch.randn(vocab, h, generator=g) / h**0.5 * 2).to(dtype).to(_device())
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).to(_device()) if bias else None
    return hidden, weight, b, _labels(n, vocab, seed=seed, n_ignored=n_ignored)


def _fused_run(fn, hidden, weight, bias, labels, grad_h=True, grad_w=True, shape=None, **kwargs):
    h = hidden.detach().clone().requires_grad_(grad_h)
    w = weight.detach().clone().requires_grad_(grad_w)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    h_in = h.view(*shape, h.shape[-1]) if shape else h
    lab = labels.view(shape) if shape else labels
    loss = fn(h_in, w, lab, b, **kwargs)
    if loss.dim() == 0:
        (loss * 0.75).backward()
    else:
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape))
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _unfused(hidden, weight, labels, bias=None, **kwargs):
    return cross_entropy(F.linear(hidden, weight, bias), labels, **kwargs)


def _assert_fused_matches(fused, unfused, dtype):
    loss, dh, dw, db = fused
    loss_u, dh_u, dw_u, db_u = unfused
    assert loss.dtype == torch.float32
    assert_close_dtype(loss, loss_u, dtype=dtype if dtype != torch.float32 else None)
    for got, want in ((dh, dh_u), (dw, dw_u), (db, db_u)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == want.dtype
            # dweight/dbias: the fused op rounds per chunk and sums chunks in fp32, the unfused
            # op rounds one whole-batch matmul; allow a second rounding's worth.
            assert_close_normwise(got, want, dtype, factor=2.0)


@pytest.mark.parametrize("backend", ["interpreter", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(reduction="sum", softcap=20.0), dict(n_items=50, label_smoothing=0.1, logit_scale=0.5),
     dict(reduction="none")],
    ids=["mean", "sum-softcap", "n_items-smooth-scale", "none"],
)
def test_fused_matches_unfused(options, dtype, backend):
    hidden, weight, bias, labels = _linear_inputs(26, 48, 1537, dtype, seed=1, n_ignored=9)
    labels[5:10] = -100  # with 5-row chunks, chunk [5, 10) is entirely ignored
    chunk_bytes = 5 * 1537 * 4
    context = use_backend("torch") if backend == "torch" else contextlib.nullcontext()
    with context:
        fused = _fused_run(fused_linear_cross_entropy, hidden, weight, bias, labels, shape=(2, 13),
                           chunk_bytes=chunk_bytes, **options)
        unfused = _fused_run(_unfused, hidden, weight, bias, labels, shape=(2, 13), **options)
    _assert_fused_matches(fused, unfused, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["one-scale", "per-row-scales"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(softcap=20.0), dict(logit_scale=0.5, label_smoothing=0.1),
     dict(softcap=3.0, logit_scale=2.0, label_smoothing=0.2)],
    ids=["plain", "softcap", "scale-smooth", "all"],
)
def test_torch_backend_rows_match_the_oracle(options, per_row, dtype, monkeypatch):
    # The CPU path's hand-written loss and gradient (one in-place softmax, walked in blocks of
    # rows) against autograd through the float64 reference, with blocks of 3 rows over 11 rows (the
    # last block short), ignored rows inside a block, and logits large enough to saturate a softcap.
    monkeypatch.setattr(ce_module, "TORCH_BLOCK_BYTES", 3 * 1537 * 4)
    logits = _logits(11, 1537, dtype, seed=4, scale=8.0).cpu()
    labels = _labels(11, 1537, seed=4, n_ignored=3).cpu()
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(11, generator=g) + 0.5 if per_row else torch.tensor([0.3])
    opts = (-100, options.get("softcap"), options.get("logit_scale"), options.get("label_smoothing", 0.0))
    z64 = logits.double().requires_grad_(True)
    loss64 = ce_module._reference_rows(z64, labels, *opts)
    (grad64,) = torch.autograd.grad(loss64, z64, scale.double() if per_row else scale.double().expand(11))
    buffer = logits.clone()
    loss, grad = ce_module._rows_torch(buffer, labels, *opts, scale, per_row, True)
    assert grad is buffer and grad.dtype == dtype and loss.dtype == torch.float32
    assert_close_dtype(loss, loss64.float())
    assert_close_normwise(grad, grad64.to(dtype), dtype)
    assert (grad[labels == -100] == 0).all() and (loss[labels == -100] == 0).all()
    # Without a gradient the losses are the same and nothing else is asked of the buffer.
    loss_only, none = ce_module._rows_torch(logits.clone(), labels, *opts, scale, per_row, False)
    assert none is None and torch.equal(loss_only, loss)


def test_torch_backend_chunks_are_big_enough_for_cpu_matmuls():
    # On CPU the lm_head matmuls dominate a step at real vocabularies and run well below their peak
    # on a few rows: the TORCH backend's chunks have at least TORCH_MIN_CHUNK_ROWS rows and a quarter
    # of the tokens, that share capped at CHUNK_BUDGET_MAX of logits; an explicit budget still rules.
    floor = ce_module.TORCH_MIN_CHUNK_ROWS
    assert ce_module.torch_min_chunk_rows(600, 262144) == floor
    assert ce_module.torch_min_chunk_rows(2048, 262144) == 512  # a quarter of the tokens
    assert ce_module.torch_min_chunk_rows(10**6, 262144) * 262144 * 4 == ce_module.CHUNK_BUDGET_MAX
    assert ce_module.torch_min_chunk_rows(10**6, 10**8) == floor  # the floor wins over the cap
    assert ce_module.logits_chunk_rows(4096, 262144, hidden_bytes=4096 * 576 * 4, min_rows=floor) == floor
    assert ce_module.logits_chunk_rows(100, 262144, hidden_bytes=100 * 576 * 4, min_rows=floor) == 100
    assert ce_module.logits_chunk_rows(4096, 262144, 4096 * 576 * 4, chunk_bytes=262144 * 4, min_rows=floor) == 1
    chunk_rows = []
    real = ce_module._fused_chunks

    def spy(*args):
        chunk_rows.append(args[-1])
        return real(*args)

    with pytest.MonkeyPatch.context() as patch, use_backend("torch"):
        patch.setattr(ce_module, "_fused_chunks", spy)
        # 600 x 70000 fp32 logits: the default budget (16 MiB) alone would allow 59 rows a chunk.
        hidden, weight, _, labels = _linear_inputs(600, 8, 70000, torch.float32, seed=6, bias=False)
        fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels).backward()
    assert chunk_rows == [floor]


@pytest.mark.parametrize("grad_h, grad_w", [(True, False), (False, True)], ids=["frozen-weight", "frozen-hidden"])
def test_fused_with_frozen_inputs(grad_h, grad_w, monkeypatch):
    hidden, weight, _, labels = _linear_inputs(20, 32, 999, torch.bfloat16, seed=2, bias=False)
    produced = []
    real = ce_module._fused_chunks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        produced.append(out)
        return out

    monkeypatch.setattr(ce_module, "_fused_chunks", spy)
    fused = _fused_run(fused_linear_cross_entropy, hidden, weight, None, labels, grad_h=grad_h, grad_w=grad_w,
                       chunk_bytes=6 * 999 * 4)
    _, grad_hidden, grad_weight, _ = produced[0]
    # A frozen lm_head (the LoRA case) gets no (V, H) fp32 accumulator at all; nor hidden a gradient.
    assert (grad_weight is not None) == grad_w and (grad_hidden is not None) == grad_h
    unfused = _fused_run(_unfused, hidden, weight, None, labels, grad_h=grad_h, grad_w=grad_w)
    _assert_fused_matches(fused, unfused, torch.bfloat16)


def test_fused_without_grad_is_loss_only():
    hidden, weight, bias, labels = _linear_inputs(10, 16, 300, torch.float32, seed=3)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels, bias)
    assert not loss.requires_grad
    assert_close_dtype(loss, fused_linear_cross_entropy_reference(hidden.detach(), weight, labels, bias))


def test_chunk_rows_follow_the_budget_not_tokens_times_vocab(monkeypatch):
    # Bound by construction: every chunk the op hands to the CE step is recorded, and its fp32
    # logits (rows * V * 4 bytes) must fit the budget however many tokens there are.
    seen = []
    real = ce_module._ce_rows
    monkeypatch.setattr(ce_module, "_ce_rows", lambda backend, logits, *a, **k: seen.append(logits.shape)
                        or real(backend, logits, *a, **k))
    budget = 64 * 1024
    vocab = 2048
    with use_backend("torch"):
        for n in (7, 64, 300):
            seen.clear()
            hidden, weight, _, labels = _linear_inputs(n, 8, vocab, torch.float32, seed=n, bias=False)
            fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels, chunk_bytes=budget).backward()
            assert sum(s[0] for s in seen) == n
            assert max(s[0] for s in seen) * vocab * 4 <= budget
    # The default budget: a few x hidden's bytes, clamped; a huge batch never grows past the cap.
    rows = ce_module.logits_chunk_rows(10**7, 262144, hidden_bytes=10**7 * 4096 * 2)
    assert rows * 262144 * 4 <= ce_module.CHUNK_BUDGET_MAX
    assert ce_module.logits_chunk_rows(16, 32000, hidden_bytes=16 * 64 * 4) == 16  # floor: tiny batch, one chunk
    assert ce_module.logits_chunk_rows(10, 10**9, hidden_bytes=1) == 1  # always at least one row


def _peak_cpu_bytes(fn):
    """Peak of live CPU-allocator bytes while ``fn`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_fused_peak_memory_does_not_grow_with_tokens_times_vocab():
    # Truly measured: torch.profiler(profile_memory=True) records every CPU allocation and free;
    # the running sum is the live memory of everything allocated inside the call.
    vocab, h, chunk_bytes = 4096, 16, 2**19

    def step(fn, n, **kwargs):
        hidden, weight, _, labels = _linear_inputs(n, h, vocab, torch.float32, seed=0, bias=False)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        return lambda: fn(hidden, weight, labels, **kwargs).backward()

    with use_backend("torch"):
        for n in (256, 1024):
            fused = _peak_cpu_bytes(step(fused_linear_cross_entropy, n, chunk_bytes=chunk_bytes))
            # What the step needs whatever the method: grad_hidden, grad_weight and its fp32 accumulator.
            own = (n * h + 2 * vocab * h) * 4
            assert fused <= own + 5 * chunk_bytes, (n, fused)  # measured: own + 3.5 chunks, for every n
        unfused = _peak_cpu_bytes(step(fused_linear_cross_entropy_reference, 1024))
    assert unfused >= 1024 * vocab * 4  # the measurement does see full logits when they exist
    assert fused < unfused / 4


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 8), torch.zeros(5, dtype=torch.long)), r"labels must have shape \(4\)"),
        (lambda: (torch.randn(2, 3, 8), torch.zeros(6, dtype=torch.long)), r"labels must have shape \(2, 3\)"),
        (lambda: (torch.randn(4, 8), torch.zeros(4)), "labels must be an integer tensor"),
        (lambda: (torch.randn(4, 8).long(), torch.zeros(4, dtype=torch.long)), "logits must have dtype"),
        (lambda: (torch.randn(4, 8), [0, 1, 2, 3]), "labels must be a torch.Tensor"),
        (lambda: (torch.randn(4, 8), torch.zeros(4, dtype=torch.long, device="meta")), "one device"),
        (lambda: (torch.tensor(1.0), torch.zeros((), dtype=torch.long)), "non-empty vocabulary"),
        (lambda: (torch.randn(4, 8), torch.tensor([0, 8, 1, 2])), r"labels must be token ids in \[0, 8\)"),
        (lambda: (torch.randn(4, 8), torch.tensor([0, -5, 1, 2])), r"labels must be token ids"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    logits, labels = make()
    for fn in (cross_entropy, cross_entropy_reference):
        with pytest.raises(ValueError, match=message):
            fn(logits, labels)


def test_float64_is_for_the_reference_only():
    logits, labels = torch.randn(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must have dtype float32, float16 or bfloat16"):
        cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="hidden must have dtype float32, float16 or bfloat16"):
        fused_linear_cross_entropy(logits, torch.randn(3, 8, dtype=torch.float64), labels)
    assert cross_entropy_reference(logits, labels).dtype == torch.float64  # gradcheck runs it in float64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(softcap=0.0), "softcap must be None or a finite number > 0"),
        (dict(softcap=-30.0), "softcap must be"),
        (dict(logit_scale=float("nan")), "logit_scale must be"),
        (dict(label_smoothing=1.0), r"label_smoothing must be a number in \[0, 1\)"),
        (dict(label_smoothing=-0.1), "label_smoothing must be"),
        (dict(n_items=0), "n_items must be > 0"),
        (dict(n_items=torch.tensor(-3)), "n_items must be > 0"),
        (dict(n_items=torch.tensor([1, 2])), "n_items must be a positive number or a one-element tensor"),
        (dict(n_items=5, reduction="sum"), "n_items is the divisor of reduction='mean'"),
        (dict(ignore_index=1.5), "ignore_index must be an integer"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    logits, labels = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    hidden, weight = torch.randn(4, 3), torch.randn(8, 3)
    for call in (
        lambda: cross_entropy(logits, labels, **kwargs),
        lambda: cross_entropy_reference(logits, labels, **kwargs),
        lambda: fused_linear_cross_entropy(hidden, weight, labels, **kwargs),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 3), torch.randn(8, 5), torch.zeros(4, dtype=torch.long), None),
         r"weight must have shape \(\*, 3\)"),
        (lambda: (torch.randn(4, 3), torch.randn(8, 3).half(), torch.zeros(4, dtype=torch.long), None),
         "weight must have hidden's dtype"),
        (lambda: (torch.randn(4, 3), torch.randn(8, 3), torch.zeros(4, dtype=torch.long), torch.randn(7)),
         r"bias must have shape \(8\)"),
        (lambda: (torch.randn(4, 3), torch.randn(8, 3), torch.zeros(4, dtype=torch.long), torch.randn(8).half()),
         "bias must have hidden's dtype"),
        (lambda: (torch.randn(2, 4, 3), torch.randn(8, 3), torch.zeros(8, dtype=torch.long), None),
         r"labels must have shape \(2, 4\)"),
        (lambda: (torch.randn(4, 3), torch.randn(8, 3), torch.zeros(4), None), "labels must be an integer tensor"),
        (lambda: (torch.randn(4, 3).long(), torch.randn(8, 3), torch.zeros(4, dtype=torch.long), None),
         "hidden must have dtype"),
        (lambda: (torch.randn(4, 3), torch.empty(8, 3, device="meta"), torch.zeros(4, dtype=torch.long), None),
         "one device"),
    ],
)
def test_fused_bad_input_is_a_clear_value_error(make, message):
    hidden, weight, labels, bias = make()
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        with pytest.raises(ValueError, match=message):
            fn(hidden, weight, labels, bias)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        fused_linear_cross_entropy(torch.randn(4, 3), torch.randn(8, 3), torch.zeros(4, dtype=torch.long),
                                   chunk_bytes=0)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_kernels_on_gpu(dtype):
    logits = _logits(64, 262144, dtype, seed=11)
    labels = _labels(64, 262144, seed=11, n_ignored=7)
    _check_against_oracle(logits, labels, softcap=30.0, label_smoothing=0.1)
    hidden, weight, bias, labels = _linear_inputs(512, 256, 32003, dtype, seed=12, n_ignored=40)
    fused = _fused_run(fused_linear_cross_entropy, hidden, weight, bias, labels, chunk_bytes=64 * 32003 * 4)
    unfused = _fused_run(_unfused, hidden, weight, bias, labels)
    _assert_fused_matches(fused, unfused, dtype)

