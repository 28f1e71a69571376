"""swiglu / geglu: Triton kernels (interpreted on CPU) vs torch references and HF activations."""

from __future__ import annotations

import pytest
import torch

from unsloth_like.kernels import geglu, geglu_reference, swiglu, swiglu_reference

from .tolerances import assert_close_dtype, assert_close_normwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 9, 344), (4099,), (3, 5, 1000), (1, 1)]
OPS = {
    "swiglu": (swiglu, swiglu_reference, {}),
    "geglu": (geglu, geglu_reference, {"approximate": "none"}),
    "geglu_tanh": (geglu, geglu_reference, {"approximate": "tanh"}),
}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, gate, up, dout, **kwargs):
    gate = gate.clone().requires_grad_(True)
    up = up.clone().requires_grad_(True)
    out = fn(gate, up, **kwargs)
    out.backward(dout)
    return out, gate.grad, up.grad


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_reference(op, dtype, shape):
    fn, reference, kwargs = OPS[op]
    g = torch.Generator().manual_seed(0)
    # gate spans the activation's interesting range, including large |x| where tanh saturates
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(_device())
    up = torch.randn(shape, generator=g).to(dtype).to(_device())
    dout = torch.randn(shape, generator=g).to(dtype).to(_device())
    out, dgate, dup = _run(fn, gate, up, dout, **kwargs)
    out_ref, dgate_ref, dup_ref = _run(reference, gate, up, dout, **kwargs)
    assert out.dtype == dtype and dgate.dtype == dtype and dup.dtype == dtype
    # Forward and dup round the activation then the product: as HF does, one ulp each.
    assert_close_dtype(out, out_ref, ulps=2.0)
    assert_close_dtype(dup, dup_ref, ulps=2.0)
    # dgate: the reference's autograd rounds dout*up and the derivative separately.
    assert_close_normwise(dgate, dgate_ref, dtype)


@pytest.mark.parametrize("name, reference", [("silu", swiglu_reference), ("gelu", geglu_reference),
                                             ("gelu_pytorch_tanh", None)])
def test_references_are_the_hf_mlp_activation(name, reference):
    from transformers.activations import ACT2FN

    gate, up = torch.randn(5, 37, dtype=torch.bfloat16), torch.randn(5, 37, dtype=torch.bfloat16)
    expected = ACT2FN[name](gate) * up
    got = geglu_reference(gate, up, "tanh") if reference is None else reference(gate, up)
    assert torch.equal(got, expected)


def test_reference_gradcheck_float64():
    gate = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_reference, (gate, up))
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda a, b: geglu_reference(a, b, approximate), (gate, up))


def test_non_contiguous_inputs():
    fused = torch.randn(6, 2 * 200)  # gate and up as halves of one projection: strided views
    gate, up = fused[:, :200], fused[:, 200:]
    assert_close_dtype(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.parametrize(
    "gate, up, message",
    [
        (torch.randn(4, 8), torch.randn(4, 9), "same shape"),
        (torch.randn(4, 8), torch.randn(4, 8).half(), "same dtype"),
        (torch.randn(4, 8).long(), torch.randn(4, 8).long(), "gate must have dtype"),
        (torch.randn(4, 8), torch.empty(4, 8, device="meta"), "one device"),
    ],
)
def test_bad_input_is_a_clear_value_error(gate, up, message):
    with pytest.raises(ValueError, match=message):
        swiglu(gate, up)


def test_bad_approximation_is_refused():
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu(torch.randn(2), torch.randn(2), approximate="erf")


@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_31_elements_index_correctly():
    n = 2**31 + 4099
    gate = torch.full((n,), 2.0, dtype=torch.bfloat16, device="cuda")
    up = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    up[-1] = 3.0
    out = swiglu(gate, up)
    expected = swiglu_reference(gate[-2:], up[-2:])
    assert torch.equal(out[-2:], expected)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_primitives_match_autograd(activation, dtype):
    """The autograd-free primitives the fused LoRA MLP uses: forward, backward, and the forward
    output recomputed by the backward pass, on both backends, against the reference's autograd."""
    from unsloth_like.kernels import gated_activation_backward, gated_activation_forward, use_backend

    g = torch.Generator().manual_seed(5)
    gate, up, dout = (torch.randn(3, 77, generator=g).to(dtype) for _ in range(3))
    reference = {"silu": swiglu_reference, "gelu": geglu_reference,
                 "gelu_tanh": lambda a, b: geglu_reference(a, b, "tanh")}[activation]
    gate_ref, up_ref = gate.clone().requires_grad_(), up.clone().requires_grad_()
    expected = reference(gate_ref, up_ref)
    expected.backward(dout)
    for backend in ("torch", "triton-interpreter") if torch.cuda.is_available() is False else ("torch", "triton"):
        with use_backend(backend):
            out = gated_activation_forward(gate, up, activation)
            dgate, dup, recomputed = gated_activation_backward(dout, gate, up, activation, need_out=True)
            assert gated_activation_backward(dout, gate, up, activation)[2] is None
        ulps = 1 if backend == "torch" else 2
        assert_close_dtype(out, expected.detach(), ulps=ulps)
        assert_close_dtype(recomputed, out, ulps=ulps)
        assert_close_dtype(dup, up_ref.grad, ulps=ulps)
        assert_close_dtype(dgate, gate_ref.grad, ulps=ulps)
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_activation_forward(gate, up, "relu")
