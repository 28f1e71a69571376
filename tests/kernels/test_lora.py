"""Fused LoRA autograd (O, QKV, gated MLP) vs the same maths through plain autograd.

The reference (``lora_projections_reference`` / ``lora_mlp_reference``) is PEFT's module chain
written out: ``base(x) + lora_B(lora_A(x)) * scaling`` with PEFT's dtype rules. Models tests
compare the fused path against real PEFT layers as well.
"""

from __future__ import annotations

import math

import pytest
import torch

from unsloth_like.kernels import (
    Projection,
    lora_linear,
    lora_mlp,
    lora_mlp_reference,
    lora_projections,
    lora_projections_reference,
    lora_qkv,
)

from .tolerances import assert_close_dtype, assert_close_normwise

bnb_f = pytest.importorskip("bitsandbytes.functional")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on a GPU, the interpreter on CPU


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _projection(out_f, in_f, rank, *, dtype, adapter_dtype=None, nf4=False, bias=False, scaling=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(dtype).to(DEVICE)
    quant_state = None
    if nf4:
        weight, quant_state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True,
                                                  quant_storage=torch.uint8)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    lora_A = lora_B = None
    if rank:
        adapter_dtype = adapter_dtype or dtype
        lora_A = (torch.randn(rank, in_f, generator=g) * 0.2).to(adapter_dtype).to(DEVICE).requires_grad_()
        lora_B = (torch.randn(out_f, rank, generator=g) * 0.2).to(adapter_dtype).to(DEVICE).requires_grad_()
    return Projection(weight, b, quant_state, dtype if nf4 else None, lora_A, lora_B, scaling)


def _input(shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE).requires_grad_()


def _grads(outputs, inputs, seed=2):
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outputs]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)


def _trainables(x, projections):
    return [x] + [t for p in projections if p.has_lora for t in (p.lora_A, p.lora_B)]


def _compare(fused_out, ref_out, fused_grads, ref_grads, dtype):
    """fp32 outputs compare elementwise (summation order only). 16-bit outputs compare norm-wise:
    each output is a sum of a base and an adapter term rounded separately by the reference and
    in one GEMM epilogue by the fused path (``addmm``), so where the terms cancel one ulp of
    theirs is a large part of the result; and in the MLP the Triton interpreter truncates the
    bf16 activation where torch rounds it, which the down matmul spreads over every output."""
    for got, want in zip(fused_out, ref_out):
        if dtype is torch.float32:
            assert_close_dtype(got, want)
        else:
            assert got.dtype == want.dtype
            assert_close_normwise(got, want, dtype)
    # Gradients are as precise as the base's compute dtype (fp32 adapter gradients over a bf16
    # base are products of bf16 intermediates).
    for got, want in zip(fused_grads, ref_grads):
        assert got.dtype == want.dtype
        assert_close_normwise(got, want, dtype, factor=4 if dtype is torch.float32 else 2)


CASES = [
    pytest.param(torch.float32, None, False, id="fp32"),
    pytest.param(torch.bfloat16, None, False, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, False, id="bf16-base-fp32-adapter"),
    pytest.param(torch.float32, None, True, id="nf4-fp32"),
    pytest.param(torch.bfloat16, torch.float32, True, id="nf4-bf16-fp32-adapter"),
    pytest.param(torch.float16, torch.float32, False, id="fp16-base-fp32-adapter"),
    pytest.param(torch.float16, None, True, id="nf4-fp16"),
]


@pytest.mark.parametrize("dtype, adapter_dtype, nf4", CASES)
def test_lora_qkv_matches_reference(dtype, adapter_dtype, nf4):
    # Qwen2-like: biased q/k/v, GQA-sized k/v, odd widths, different ranks and scalings (rsLoRA)
    q = _projection(72, 88, 5, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, bias=True, seed=10)
    k = _projection(24, 88, 3, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, bias=True, seed=11,
                    scaling=16 / math.sqrt(3))
    v = _projection(24, 88, 5, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, bias=True, seed=12, scaling=2.0)
    x = _input((2, 7, 88), dtype)
    fused = lora_qkv(x, q, k, v)
    ref = lora_projections_reference(x, q, k, v)
    inputs = _trainables(x, (q, k, v))
    _compare(fused, ref, _grads(fused, inputs), _grads(ref, inputs), dtype)


@pytest.mark.parametrize("dtype, adapter_dtype, nf4", CASES)
def test_lora_linear_matches_reference(dtype, adapter_dtype, nf4):
    o = _projection(88, 72, 6, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, seed=20)
    x = _input((3, 5, 72), dtype)
    fused, ref = (lora_linear(x, o),), lora_projections_reference(x, o)
    inputs = _trainables(x, (o,))
    _compare(fused, ref, _grads(fused, inputs), _grads(ref, inputs), dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype, adapter_dtype, nf4", CASES)
def test_lora_mlp_matches_reference(dtype, adapter_dtype, nf4, activation):
    gate = _projection(136, 88, 4, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, seed=30)
    up = _projection(136, 88, 4, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, seed=31)
    down = _projection(88, 136, 4, dtype=dtype, adapter_dtype=adapter_dtype, nf4=nf4, seed=32)
    x = _input((2, 9, 88), dtype)
    fused = (lora_mlp(x, gate, up, down, activation),)
    ref = (lora_mlp_reference(x, gate, up, down, activation),)
    inputs = _trainables(x, (gate, up, down))
    _compare(fused, ref, _grads(fused, inputs), _grads(ref, inputs), dtype)


def test_partial_adapters_and_frozen_input():
    """Adapters on some projections only (target_modules without k, or without up); an input that
    needs no gradient (the first layer under frozen embeddings) gets none."""
    q = _projection(40, 64, 4, dtype=torch.float32, seed=1)
    k = _projection(16, 64, 0, dtype=torch.float32, seed=2)
    v = _projection(16, 64, 4, dtype=torch.float32, seed=3)
    x = torch.randn(3, 64, device=DEVICE)
    fused, ref = lora_qkv(x, q, k, v), lora_projections_reference(x, q, k, v)
    inputs = _trainables(x, (q, k, v))[1:]
    _compare(fused, ref, _grads(fused, inputs), _grads(ref, inputs), torch.float32)

    gate, up, down = (_projection(96, 64, 4, dtype=torch.float32, seed=4), _projection(96, 64, 0, dtype=torch.float32),
                      _projection(64, 96, 0, dtype=torch.float32, seed=6))
    x = _input((5, 64), torch.float32)
    fused, ref = (lora_mlp(x, gate, up, down),), (lora_mlp_reference(x, gate, up, down),)
    inputs = _trainables(x, (gate, up, down))
    _compare(fused, ref, _grads(fused, inputs), _grads(ref, inputs), torch.float32)


def test_autocast_matches_reference_under_autocast():
    """Mixed precision as the Trainer runs it (bf16 autocast over fp32 weights and adapters):
    backward re-enters the forward's autocast state, so gradients match autograd's."""
    projections = [_projection(48, 64, 4, dtype=torch.float32, seed=s) for s in (1, 2)]
    x = _input((4, 64), torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = lora_projections(x, *projections)
        ref = lora_projections_reference(x, *projections)
    assert fused[0].dtype == ref[0].dtype == torch.bfloat16
    inputs = _trainables(x, projections)
    for got, want in zip(fused, ref):
        assert_close_dtype(got, want, ulps=2)
    for got, want in zip(_grads(fused, inputs), _grads(ref, inputs)):
        assert_close_normwise(got, want, torch.bfloat16, factor=2)


def test_nothing_dequantised_is_saved():
    """Backward gets by with the packed NF4 bytes: the saved tensors are the input, the gate/up
    outputs and the small X·Aᵀ products, never a (out, in) dense weight."""
    gate, up = (_projection(136, 88, 4, dtype=torch.float32, nf4=True, seed=s) for s in (1, 2))
    down = _projection(88, 136, 4, dtype=torch.float32, nf4=True, seed=3)
    x = _input((2, 5, 88), torch.float32)
    out = lora_mlp(x, gate, up, down)
    saved = [t.shape for t in out.grad_fn.saved_tensors]
    assert sorted(saved) == sorted([(10, 88), (10, 136), (10, 136), (10, 4), (10, 4), (10, 4)])


def test_bad_input_is_refused():
    p = _projection(16, 32, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="expects 32"):
        lora_linear(torch.randn(3, 31, device=DEVICE), p)
    with pytest.raises(ValueError, match="together"):
        lora_linear(torch.randn(3, 32, device=DEVICE), Projection(p.weight, lora_A=p.lora_A))
    with pytest.raises(ValueError, match="activation must be one of"):
        lora_mlp(torch.randn(3, 32, device=DEVICE), p, p, p, activation="relu")
    with pytest.raises(ValueError, match="do not chain"):
        lora_mlp(torch.randn(3, 32, device=DEVICE), p, p, p)
    with pytest.raises(TypeError, match="floating-point"):
        lora_linear(torch.ones(3, 32, dtype=torch.long, device=DEVICE), p)
