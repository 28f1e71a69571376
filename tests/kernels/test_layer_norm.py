"""layer_norm: Triton kernel (interpreted on CPU) vs torch reference; reference vs nn.LayerNorm."""

from __future__ import annotations

import pytest
import torch

from unsloth_like.kernels import layer_norm, layer_norm_reference

from .tolerances import assert_close_dtype, assert_close_normwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 7, 1000), (37, 1280), (1, 64), (2, 3, 5, 96)]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)  # a real mean to subtract
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(param_dtype or dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(param_dtype or dtype)
    return x.to(_device()), w.to(_device()), b.to(_device())


def _run(fn, x, w, b, dy):
    x = x.clone().requires_grad_(True)
    w = None if w is None else w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = fn(x, w, b, 1e-5)
    y.backward(dy.to(y.dtype))
    return y, x.grad, None if w is None else w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_forward_and_gradients_match_reference(shape, dtype, affine):
    x, w, b = _inputs(shape, dtype)
    w = None if affine == "none" else w
    b = b if affine == "weight+bias" else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(_device())
    got = _run(layer_norm, x, w, b, dy)
    want = _run(layer_norm_reference, x, w, b, dy)
    assert_close_dtype(got[0], want[0])  # both round the fp32 result once
    assert_close_normwise(got[1], want[1], dtype)
    for g, r in zip(got[2:], want[2:]):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == r.dtype
            assert_close_normwise(g, r, dtype, factor=2.0)  # sums over every row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_parameters_on_half_activations(dtype):
    x, w, b = _inputs((6, 200), dtype, param_dtype=torch.float32)
    dy = torch.randn(6, 200).to(_device())
    got, want = _run(layer_norm, x, w, b, dy), _run(layer_norm_reference, x, w, b, dy)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    assert_close_dtype(got[0], want[0])
    assert_close_normwise(got[2], want[2], dtype, factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_nn_layernorm(dtype):
    x, w, b = _inputs((4, 9, 200), dtype)
    module = torch.nn.LayerNorm(200, eps=1e-6).to(device=x.device, dtype=dtype)
    module.weight.data.copy_(w)
    module.bias.data.copy_(b)
    assert torch.equal(layer_norm_reference(x, w, b, 1e-6), module(x))


def test_reference_gradcheck_float64():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: layer_norm_reference(a, c, d, 1e-5), (x, w, b))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 8), torch.randn(7), None), r"weight must have shape \(8\)"),
        ((torch.randn(4, 8), None, torch.randn(9)), r"bias must have shape \(8\)"),
        ((torch.randn(4, 8).int(), None, None), "x must have dtype"),
        ((torch.randn(4, 8), torch.empty(8, device="meta"), None), "one device"),
    ],
)
def test_bad_input_is_a_clear_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        layer_norm(*args)
