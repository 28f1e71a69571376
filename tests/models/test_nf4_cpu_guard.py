"""Right 4-bit maths whatever bitsandbytes' CPU kernel does: the probe, the guard, the baselines.

Whichever host runs them, these tests register a stand-in for bitsandbytes' native CPU
``dequantize_4bit`` that reproduces its AVX512 bug (the absmax indexed as if every row started a
new block) or that refuses to run at all, and show that the probe sees it, that our fused QLoRA
path never calls it, that guarded models compute what correct bitsandbytes computes, and that the
harness's rerouting makes plain baselines right again.
"""

from __future__ import annotations

import logging
import math
import warnings

import peft
import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
from unsloth_like import FastLanguageModel, FastModel
from unsloth_like.host import DequantizeProbe, probe_dequantize
from unsloth_like.models import nf4_cpu_guard
from unsloth_like.models.nf4_cpu_guard import guard_4bit_layers, unguard_4bit_layers
from unsloth_like.models.patching import lora_fusion_report
from unsloth_like.testing.bitsandbytes_cpu import (
    BaselineRouting,
    bitsandbytes_torch_dequantize_4bit,
    cpu_dequantize_4bit_kernel,
)
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir

from ..kernels.tolerances import assert_close_normwise

WRONG = DequantizeProbe("wrong", 1.5)
TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please."]


def avx512_like_dequantize(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' AVX512 CPU kernel, bug included: for rows of a multiple of 16 elements, element
    (r, c) is scaled by ``absmax[r * (n // blocksize) + c // blocksize]``, right only when the row
    length ``n`` is a multiple of the blocksize."""
    n = shape[-1]
    if n % 16 or n % blocksize == 0 or blocksize < 16:
        return bitsandbytes_torch_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    data = A.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[: math.prod(shape)]
    code = bnb_f.get_4bit_type(quant_type, device=A.device)
    rows, cols = torch.arange(nibbles.numel()) // n, torch.arange(nibbles.numel()) % n
    scale = absmax.float()[rows * (n // blocksize) + cols // blocksize]
    return (code[nibbles] * scale).to(dtype).reshape(shape)


def refusing_dequantize(*args):
    raise AssertionError("bitsandbytes' CPU dequantize_4bit was called")


def _bnb_dequantize(packed, state):
    return bnb_f.dequantize_4bit(packed, state, quant_type="nf4")


@pytest.fixture
def broken_native(bnb_routing):
    """bitsandbytes' CPU kernel replaced by the AVX512 stand-in, on any host (below the harness's
    own rerouting when that is on: lifted here, restored afterwards)."""
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(avx512_like_dequantize):
        yield


def test_stand_in_reproduces_the_measured_bug(broken_native):
    probe = probe_dequantize(_bnb_dequantize)
    assert probe.wrong and probe.max_error > 0.3
    w = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    packed, state = bnb_f.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=False)
    assert (_bnb_dequantize(packed, state) - w).abs().max() > 0.5  # the quantisation error is ~0.3
    w = torch.randn(7, 128, generator=torch.Generator().manual_seed(1))  # aligned rows: right
    packed, state = bnb_f.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=False)
    assert torch.equal(_bnb_dequantize(packed, state), bitsandbytes_torch_dequantize_4bit(
        packed, state.absmax, 128, "nf4", state.shape, state.dtype))


def test_probe_reports_a_right_kernel_and_one_that_fails(bnb_routing):
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit):
        assert probe_dequantize(_bnb_dequantize) == DequantizeProbe("correct", 0.0)
    assert "WRONG" in WRONG.describe() and "correct" in DequantizeProbe("correct", 0.0).describe()


def test_baseline_routing_makes_a_wrong_kernel_right(broken_native):
    routing = BaselineRouting(probe_dequantize(_bnb_dequantize))
    try:
        assert routing.routed and "pure-torch" in routing.describe()
        assert probe_dequantize(_bnb_dequantize).status == "correct"
        with routing.native():
            assert probe_dequantize(_bnb_dequantize).wrong
        assert probe_dequantize(_bnb_dequantize).status == "correct"
    finally:
        routing.close()
    assert probe_dequantize(_bnb_dequantize).wrong  # the kernel below it is back


def test_right_kernel_is_not_rerouted():
    routing = BaselineRouting(DequantizeProbe("correct", 0.0))
    assert not routing.routed and "as is" in routing.describe()
    routing.close()


def _batch(tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_qlora(zoo_cache, **lora):
    """The zoo Llama in NF4 with plain PEFT adapters (seeded, B non-zero so adapters matter)."""
    base, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache, load_in_4bit=True)
    config = peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", **lora,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = peft.get_peft_model(base, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _affected_layers(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                  and m.weight.quant_state.shape[-1] % m.weight.quant_state.blocksize != 0)


def test_guard_gives_unfused_peft_layers_the_right_maths(zoo_cache, broken_native, caplog):
    # PEFT's own (unfused) modules on an unpatched model: every base layer runs bitsandbytes' forward.
    reference, tokenizer = _plain_qlora(zoo_cache)
    batch = _batch(tokenizer)
    with cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit):  # right maths for the reference
        loss_ref, grads_ref = _step(reference, batch)

    unguarded, _ = _plain_qlora(zoo_cache)
    loss_wrong, _ = _step(unguarded, batch)
    assert abs(loss_wrong.item() - loss_ref.item()) > 1e-3  # the stand-in does change the maths

    guarded, _ = _plain_qlora(zoo_cache)
    with caplog.at_level(logging.WARNING, logger=nf4_cpu_guard.__name__):
        names = guard_4bit_layers(guarded, probe=WRONG)
    assert names and sorted(names) == _affected_layers(guarded)  # rows that are not a multiple of 64
    [record] = [r for r in caplog.records if r.name == nf4_cpu_guard.__name__]
    assert f"{len(names)} NF4 layers" in record.message and "o_proj" in record.message
    assert "save_pretrained_merged" in record.message
    assert guard_4bit_layers(guarded, probe=WRONG) == names  # idempotent, no second warning
    assert len([r for r in caplog.records if r.name == nf4_cpu_guard.__name__]) == 1

    loss, grads = _step(guarded, batch)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert_close_normwise(grads[name], grad, torch.float32, factor=50)

    unguard_4bit_layers(guarded)
    assert _step(guarded, batch)[0].item() == pytest.approx(loss_wrong.item(), abs=1e-6)


def test_layers_with_aligned_rows_keep_bitsandbytes():
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4"), bnb.nn.Linear4bit(200, 64, quant_type="nf4"),
                                bnb.nn.Linear4bit(96, 64, quant_type="fp4")).to("cpu")
    assert guard_4bit_layers(model, probe=WRONG) == ["1"]  # 128 % 64 == 0; FP4 is named, not guarded
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__


def test_models_without_affected_layers_never_probe(zoo_cache, monkeypatch):
    """A 16-bit load (or 4-bit layers with aligned rows) neither runs the probe nor warns: users who
    do not use bitsandbytes on the CPU never hear of it."""
    def no_probe():
        raise AssertionError("probed")

    monkeypatch.setattr(nf4_cpu_guard, "bitsandbytes_cpu_probe", no_probe)
    model, _ = load_zoo_model("qwen2", cache_dir=zoo_cache)
    assert guard_4bit_layers(model) == []
    aligned = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4")).to("cpu")
    assert guard_4bit_layers(aligned) == []


def test_guard_does_nothing_where_bitsandbytes_is_right(zoo_cache):
    model, _ = load_zoo_model("llama", cache_dir=zoo_cache, load_in_4bit=True)
    assert guard_4bit_layers(model, probe=DequantizeProbe("correct", 0.0)) == []
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
def test_guarded_layer_is_bitsandbytes_forward(compute_dtype, bias, bnb_routing):
    """One layer, every branch of the guarded forward against bitsandbytes' forward with a right
    kernel: values, input and bias gradients, 3-D inputs, eval without grad (and no CPU repack)."""
    def layer():
        torch.manual_seed(0)
        dense = torch.nn.Linear(200, 96, bias=bias != "none")
        m = bnb.nn.Linear4bit(200, 96, bias=bias != "none", compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)
        m.load_state_dict(dense.state_dict())
        m = m.to("cpu")  # quantises
        if bias == "trainable":
            m.bias.requires_grad_(True)
        elif m.bias is not None:
            m.bias.requires_grad_(False)
        return m

    x = torch.randn(2, 5, 200, generator=torch.Generator().manual_seed(2))
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit):
        expected_layer = layer()
        x_ref = x.clone().requires_grad_(True)
        expected = expected_layer(x_ref)
        expected.square().sum().backward()
    guarded_layer = layer()
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(refusing_dequantize):
        guard_4bit_layers(guarded_layer, probe=WRONG)
        x_ours = x.clone().requires_grad_(True)
        result = guarded_layer(x_ours)
        result.square().sum().backward()
        guarded_layer.eval()
        with torch.no_grad():
            evaluated = guarded_layer(x)
    assert result.dtype == expected.dtype == torch.float32 and result.shape == (2, 5, 96)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if bias == "trainable":  # the bias lives in the compute dtype (bitsandbytes casts it), so does its gradient
        assert guarded_layer.bias.dtype == expected_layer.bias.dtype == compute_dtype
        # a sum over 10 rows rounded to bf16 by different reductions: norm-wise, ulps of the dtype
        assert_close_normwise(guarded_layer.bias.grad, expected_layer.bias.grad, compute_dtype)
    torch.testing.assert_close(evaluated, expected.detach(), rtol=1e-6, atol=1e-6)
    assert not getattr(guarded_layer.weight.quant_state, "packing_format_for_cpu", False)


def test_fused_qlora_never_calls_bitsandbytes_dequantize(zoo_cache, bnb_routing, monkeypatch):
    """Our loader + get_peft_model on an affected host: a kernel that refuses to run is never
    reached in training (fused groups dequantise with our kernel, and the loader guards the rest)."""
    monkeypatch.setattr(nf4_cpu_guard, "bitsandbytes_cpu_probe", lambda: WRONG)
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=True,
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    assert set(lora_fusion_report(model).values()) == {"fused"}
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(refusing_dequantize):
        loss, grads = _step(model, _batch(tokenizer))
    assert torch.isfinite(loss) and grads


def test_fast_model_loads_are_guarded_too(zoo_cache, bnb_routing, monkeypatch):
    """FastModel (unpatched, PEFT's modules): the same loss as plain bitsandbytes with a right kernel."""
    monkeypatch.setattr(nf4_cpu_guard, "bitsandbytes_cpu_probe", lambda: WRONG)
    model, tokenizer = FastModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=True)
    plain, _ = load_zoo_model("llama", cache_dir=zoo_cache, load_in_4bit=True)
    batch = _batch(tokenizer)
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(avx512_like_dequantize):
        model.train()
        with torch.no_grad():
            ours = model(**batch).loss
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit):
        plain.train()
        with torch.no_grad():
            expected = plain(**batch).loss
    assert abs(ours.item() - expected.item()) <= 1e-5 * expected.item()


def test_8bit_layers_are_right_on_this_host():
    """8-bit layers take other bitsandbytes kernels than the 4-bit dequantisation; on rows of any
    length they compute LLM.int8()'s maths, checked here in float64: in training the int8 weight
    rescaled row-wise then a float matmul, in eval the row-wise int8 input times the int8 weight
    (torch._int_mm on AVX512 CPUs), rescaled."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(200, 344)
    layer = bnb.nn.Linear8bitLt(200, 344, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantises
    x = torch.randn(2, 7, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
    assert layer.weight.dtype == torch.int8
    weight_int8, weight_scale = layer.weight.data.double(), layer.state.SCB.double().unsqueeze(1)
    rows = x.reshape(-1, 200).double()
    expected_train = rows @ (weight_int8 * weight_scale / 127).t() + layer.bias.double()
    rows16 = rows.half().float()  # eval quantises the input from fp16 (bitsandbytes casts it, and says so)
    row_absmax = rows16.abs().amax(dim=1, keepdim=True)
    x_int8 = torch.round(rows16 * (127.0 / row_absmax)).double()
    expected_eval = (x_int8 @ weight_int8.t()) * (row_absmax.double() * weight_scale.t()) / 127**2
    expected_eval = expected_eval + layer.bias.double()
    torch.testing.assert_close(trained.reshape(-1, 344).double(), expected_train, rtol=1e-5, atol=1e-5)
    # the int8 product is exact; its rescaling runs in fp16: two fp16 ulps
    torch.testing.assert_close(evaluated.reshape(-1, 344).double(), expected_eval, rtol=2 * 2**-10, atol=2 * 2**-10)
    assert (evaluated - dense(x)).abs().max() < 0.05  # and near the float layer (int8 rounding)


def test_bitsandbytes_inference_repacking_is_off_for_guarded_models(bnb_routing):
    """bitsandbytes repacks CPU 4-bit weights on the first eval-mode no-grad forward where the CPU
    has avx512_bf16: it asserts the output size is a multiple of 32 (Qwen2.5-VL-7B's vision MLP has
    3420 outputs), and a repacked layer cannot train any more (Unsloth's vision notebooks generate
    before training). Guarded models never repack: eval and training after it give bitsandbytes'
    plain maths; unguarding gives the repacking back."""
    def layer(out_features=112):
        torch.manual_seed(0)
        m = bnb.nn.Linear4bit(128, out_features, bias=True, quant_type="nf4", compress_statistics=True).to("cpu")
        m.support_avx512bf16_for_cpu = True  # as on such a host
        return m

    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match="N must be divisible by block_n"), torch.no_grad():
        layer().eval()(x)
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():  # the repacked layout's kernel exists only there
        repacked = layer(96)
        with torch.no_grad():
            repacked.eval()(x)
        assert repacked.weight.quant_state.packing_format_for_cpu  # and stays so in train mode
    with bnb_routing.native(), cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit):
        reference = layer()
        reference.support_avx512bf16_for_cpu = False  # the plain dequantise-and-matmul path
        expected = reference(x)
    guarded = torch.nn.Sequential(layer())
    assert guard_4bit_layers(guarded, probe=DequantizeProbe("correct", 0.0)) == []  # aligned rows: bitsandbytes' maths
    assert guarded[0].support_avx512bf16_for_cpu is False
    guarded.eval()
    with torch.no_grad():
        torch.testing.assert_close(guarded(x), expected.detach(), rtol=1e-6, atol=1e-6)
    assert not getattr(guarded[0].weight.quant_state, "packing_format_for_cpu", False)
    guarded.train()
    guarded[0].bias.requires_grad_(True)
    out = guarded(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert guarded[0].bias.grad is not None
    unguard_4bit_layers(guarded)
    assert guarded[0].support_avx512bf16_for_cpu is True
