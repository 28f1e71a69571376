"""The fused LoRA autograd against PEFT's own layers (``lora.Linear``, ``lora.bnb.Linear4bit``).

Real PEFT modules around real base layers (dense and bitsandbytes NF4), described by
``lora_fusion.describe_projection`` and run through ``kernels.lora``: outputs and the gradients
of X, A and B must equal what PEFT's modules compute through autograd.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsloth_like.kernels import lora_mlp, lora_projections, use_backend
from unsloth_like.models.lora_fusion import describe_projection

from ..kernels.tolerances import assert_close_normwise

bnb = pytest.importorskip("bitsandbytes")

HIDDEN, INTER = 200, 344  # not multiples of 64 or of each other


class _Block(nn.Module):
    """q/k/v (biased, GQA-sized k/v) and a gated MLP, like one decoder layer's projections."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def linear(i, o, bias=False):
            layer = nn.Linear(i, o, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(o, i, generator=g) * i ** -0.5)
                if bias:
                    layer.bias.copy_(torch.randn(o, generator=g) * 0.1)
            return layer.to(dtype)

        self.q_proj, self.k_proj, self.v_proj = linear(HIDDEN, 96, True), linear(HIDDEN, 48, True), linear(HIDDEN, 48, True)
        self.gate_proj, self.up_proj, self.down_proj = linear(HIDDEN, INTER), linear(HIDDEN, INTER), linear(INTER, HIDDEN)


def _quantize(block, dtype):
    for name, child in list(block.named_children()):
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to("cpu")
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(block, name, layer)
    return block


def _peft_block(dtype, nf4, **lora):
    block = _Block(dtype)
    if nf4:
        block = _quantize(block, dtype)
    config = peft.LoraConfig(r=6, lora_alpha=9, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                "up_proj", "down_proj"], **lora)
    model = peft.get_peft_model(block, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    model.train()
    return model.base_model.model


def _adapters(modules):
    return [t for m in modules for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def _check(fused, upstream, inputs, dtype):
    g = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(o.shape, generator=g).to(o.dtype) for o in upstream]
    for got, want in zip(fused, upstream):
        assert got.dtype == want.dtype
        assert_close_normwise(got, want, dtype, factor=5 if dtype is torch.float32 else 1)  # fp32: 1e-5
    fused_grads = torch.autograd.grad(fused, inputs, cotangents)
    upstream_grads = torch.autograd.grad(upstream, inputs, cotangents)
    for got, want in zip(fused_grads, upstream_grads):
        assert got.dtype == want.dtype
        assert_close_normwise(got, want, dtype, factor=5 if dtype is torch.float32 else 2)


CASES = [
    pytest.param(torch.float32, False, {}, id="fp32"),
    pytest.param(torch.float32, False, {"use_rslora": True}, id="fp32-rslora"),
    pytest.param(torch.bfloat16, False, {}, id="bf16-base-fp32-adapters"),
    pytest.param(torch.float32, True, {}, id="nf4-fp32"),
    pytest.param(torch.bfloat16, True, {"use_rslora": True}, id="nf4-bf16-rslora"),
]


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype, nf4, lora", CASES)
def test_fused_qkv_equals_peft_layers(dtype, nf4, lora):
    block = _peft_block(dtype, nf4, **lora)
    modules = (block.q_proj, block.k_proj, block.v_proj)
    if lora.get("use_rslora"):
        assert math.isclose(block.q_proj.scaling["default"], 9 / math.sqrt(6))
    projections = [describe_projection(m) for m in modules]
    assert all(p.has_lora and p.quantized == nf4 for p in projections)
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    _check(lora_projections(x, *projections), [m(x) for m in modules], [x, *_adapters(modules)], dtype)


@pytest.mark.parametrize("dtype, nf4, lora", CASES)
def test_fused_mlp_equals_peft_layers(dtype, nf4, lora):
    block = _peft_block(dtype, nf4, **lora)
    modules = (block.gate_proj, block.up_proj, block.down_proj)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
    upstream = block.down_proj(F.silu(block.gate_proj(x)) * block.up_proj(x))
    fused = lora_mlp(x, *(describe_projection(m) for m in modules))
    _check([fused], [upstream], [x, *_adapters(modules)], dtype)
