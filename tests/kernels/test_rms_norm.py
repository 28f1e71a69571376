"""rms_norm: Triton kernel (interpreted on CPU) vs torch reference; reference vs HF modules."""

from __future__ import annotations

import pytest
import torch

from unsloth_like.kernels import rms_norm, rms_norm_reference
from unsloth_like.kernels._backend import Backend, select_backend

from .tolerances import assert_close_dtype, assert_close_normwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 7, 1000), (37, 4099), (1, 64), (2, 3, 5, 96)]
pytestmark = pytest.mark.skipif(
    select_backend(torch.ones(1)) is Backend.TORCH and not torch.cuda.is_available(),
    reason="needs Triton (interpreter on CPU or a CUDA device)",
)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, weight_dtype=None, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    weight = (torch.randn(shape[-1], generator=g) * 0.1 + (0.0 if offset else 1.0)).to(weight_dtype or dtype)
    return x.to(_device()), weight.to(_device())


def _run(fn, x, weight, dy, **kwargs):
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    y = fn(x, weight, **kwargs)
    y.backward(dy.to(y.dtype))
    return y, x.grad, weight.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_forward_and_gradients_match_reference(shape, dtype, offset):
    x, weight = _inputs(shape, dtype, offset=offset)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(_device())
    y, dx, dw = _run(rms_norm, x, weight, dy, eps=1e-6, offset=offset)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, weight, dy, eps=1e-6, offset=offset)
    # llama mode rounds twice (normalised value, then the product): allow an ulp for each.
    assert_close_dtype(y, y_ref, ulps=1.0 if offset else 2.0)
    assert dx.dtype == x.dtype and dw.dtype == weight.dtype
    assert_close_normwise(dx, dx_ref, dtype)
    # dweight sums over all rows: the reference rounds each row's product to the dtype first.
    assert_close_normwise(dw, dw_ref, dtype, factor=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_on_half_activations_promotes_like_hf(dtype):
    x, weight = _inputs((5, 200), dtype, weight_dtype=torch.float32)
    y, dx, dw = _run(rms_norm, x, weight, torch.randn(5, 200).to(_device()))
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, weight, torch.randn(5, 200).to(_device()))
    assert y.dtype == torch.float32 and dw.dtype == torch.float32 and dx.dtype == dtype
    assert_close_dtype(y, y_ref, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_hf_llama_rmsnorm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, weight = _inputs((4, 9, 200), dtype)
    module = LlamaRMSNorm(200, eps=1e-5).to(device=x.device, dtype=dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(rms_norm_reference(x, weight, eps=1e-5), module(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma_reference_is_hf_gemma_rmsnorm_bit_for_bit(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    x, weight = _inputs((4, 9, 200), dtype, offset=1.0)
    module = GemmaRMSNorm(200, eps=1e-6).to(device=x.device, dtype=dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(rms_norm_reference(x, weight, eps=1e-6, offset=1.0), module(x))


def test_non_contiguous_input_and_no_weight_grad():
    x, weight = _inputs((6, 40, 128), torch.float32)
    x_t = x.transpose(0, 1)  # (40, 6, 128), not contiguous
    x_t.requires_grad_(True)
    y = rms_norm(x_t, weight)  # weight does not require grad
    y.sum().backward()
    x_r = x.transpose(0, 1).clone().requires_grad_(True)
    rms_norm_reference(x_r, weight).sum().backward()
    assert_close_dtype(y, rms_norm_reference(x.transpose(0, 1), weight))
    assert_close_normwise(x_t.grad, x_r.grad, torch.float32)


def test_reference_gradcheck_float64():
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    for offset in (0.0, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: rms_norm_reference(a, b, 1e-6, offset), (x, w))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 8), torch.randn(7)), r"weight must have shape \(8\)"),
        (lambda: (torch.randn(4, 8).long(), torch.randn(8)), "x must have dtype float32, float16 or bfloat16"),
        (lambda: (torch.randn(4, 8), torch.randn(8).double()), "weight must have dtype"),
        (lambda: (torch.randn(4, 8), torch.empty(8, device="meta")), "one device"),
        (lambda: (torch.tensor(1.0), torch.randn(1)), "at least one dimension"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    x, w = make()
    with pytest.raises(ValueError, match=message):
        rms_norm(x, w)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="cast_mode must be one of"):
        rms_norm(torch.randn(2, 8), torch.randn(8), cast_mode="mistral")
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        rms_norm(torch.randn(2, 8), torch.randn(8), eps=-1.0)
