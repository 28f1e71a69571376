"""K-quants (Q2_K … Q6_K): byte-identical to llama.cpp, sane round trips, CPU == CUDA.

The llama.cpp comparisons call ggml's own quantiser through llama-cpp-python (the ``gguf-check``
extra) and are skipped without it; the round-trip tests only need the ``gguf`` package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from unsloth_like.save.gguf import kquants
from unsloth_like.save.gguf.kquants import BLOCK_BYTES, K_QUANT_TYPES, quantize_k
from unsloth_like.testing import llamacpp

needs_llamacpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason=f"llama-cpp-python is not installed, so there is no llama.cpp to compare with ({llamacpp.INSTALL_HINT})")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=g)


def _student_t(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # df=2: heavy tails, so sub-blocks mix a few large values with many small ones.
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, 2, generator=g).square().sum(-1)
    return normal / (chi2 / 2).sqrt()


def _zeros(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.zeros(rows, cols)


def _constant(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # Positive, negative and zero constants: the "max == min" and all-zero paths of the searches.
    values = torch.tensor([0.37, -0.37, 0.0, 5.0, -1e-3, 2.0, -7.5])[torch.arange(rows) % 7]
    return values.unsqueeze(1).expand(rows, cols).clone()


def _outlier(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] = 1000.0 * torch.tensor([1.0, -1.0])[
        torch.arange(rows) % 2]
    return x


def _tiny(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # 1e-8: the fp16 super-scales underflow to zero and ggml keeps the search's levels.
    return torch.randn(rows, cols, generator=g) * 1e-8


def _denormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # float32 denormals: inverse scales overflow to inf, the out-of-range path of nearest_int.
    return torch.randn(rows, cols, generator=g) * 1e-39


def _near_min_normal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # ~3e-38: the sub-block scales are denormal and the super-block's inverse scale overflows.
    return torch.randn(rows, cols, generator=g) * 3e-38


def _positive(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, cols, generator=g) * 2


def _half_steps(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    # Values on a coarse grid hit exact rounding ties (x.5), where nearest_int rounds to even.
    return torch.randint(-8, 8, (rows, cols), generator=g).float() / 2


def _sparse(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=g)
    return torch.where(torch.rand(rows, cols, generator=g) < 0.6, 0.0, x)


def _bf16(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()


def _fp16(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=g) * 0.05).half()


CASES: dict[str, tuple[Callable[[int, int, torch.Generator], torch.Tensor], int, int]] = {
    "normal": (_normal, 33, 768),
    "student_t": (_student_t, 7, 512),
    "zeros": (_zeros, 3, 256),
    "constant": (_constant, 7, 512),
    "outlier": (_outlier, 7, 768),
    "tiny": (_tiny, 33, 256),
    "denormal": (_denormal, 3, 512),
    "near_min_normal": (_near_min_normal, 3, 512),
    "positive": (_positive, 7, 512),
    "half_steps": (_half_steps, 7, 256),
    "sparse": (_sparse, 3, 768),
    "bf16_input": (_bf16, 33, 512),
    "fp16_input": (_fp16, 7, 768),
}


def _case(name: str, seed: int = 0) -> torch.Tensor:
    make, rows, cols = CASES[name]
    return make(rows, cols, _gen(seed))


def _assert_same_bytes(ours: np.ndarray, ref: np.ndarray, qtype: str) -> None:
    block = BLOCK_BYTES[qtype]
    ours, ref = ours.reshape(-1, block), ref.reshape(-1, block)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    if bad.size:
        first = bad[0]
        cols = np.flatnonzero(ours[first] != ref[first])
        pytest.fail(f"{qtype}: {bad.size}/{len(ours)} blocks differ from llama.cpp; block {first} at byte "
                    f"offsets {cols.tolist()[:12]}: ours {ours[first, cols[:12]].tolist()} "
                    f"vs llama.cpp {ref[first, cols[:12]].tolist()}")


@needs_llamacpp
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_bytes_match_llamacpp(qtype: str, case: str) -> None:
    x = _case(case)
    ours = quantize_k(x, qtype).numpy()
    ref = np.frombuffer(llamacpp.ggml_quantize(x.float().numpy(), qtype), dtype=np.uint8)
    assert ours.size == ref.size
    _assert_same_bytes(ours, ref, qtype)


@needs_llamacpp
def test_llamacpp_helper_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="unknown ggml type"):
        llamacpp.ggml_quantize(np.zeros((1, 256), np.float32), "Q7_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        llamacpp.ggml_quantize(np.zeros((1, 100), np.float32), "Q4_K")


# Relative RMS error (‖deq - x‖ / ‖x‖) of Gaussian weights. A uniform quantiser with step Δ has
# an RMS error of Δ/√12. Δ is the sub-block's range over its 2^b - 1 steps for the types with a
# minimum (range ≈3.5σ for Q2_K's 16 values, ≈4.1σ for Q4_K/Q5_K's 32) and max|x| / 2^(b-1) for
# the symmetric ones (max|x| ≈2σ for 16 values), which predicts ≈0.34, 0.14, 0.078, 0.038, 0.018
# for Q2_K…Q6_K: each extra bit halves the error. Measured on 33×768, seeds 0-5 (the scale
# searches beat the estimate where they can move the range): Q2_K 0.297-0.299, Q3_K 0.150-0.152,
# Q4_K 0.071-0.072, Q5_K 0.036, Q6_K 0.0176-0.0179. The bounds leave ~10% margin for the seed
# spread, far less than the factor 2 a lost bit would cost.
REL_RMS_BOUND = {"Q2_K": 0.33, "Q3_K": 0.167, "Q4_K": 0.079, "Q5_K": 0.040, "Q6_K": 0.0195}


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_round_trip_error_and_layout(qtype: str) -> None:
    gtype = GGMLQuantizationType[qtype]
    for seed in (0, 1):
        x = _case("normal", seed)
        packed = quantize_k(x, qtype)
        assert packed.dtype == torch.uint8 and packed.device == x.device
        assert tuple(packed.shape) == quants.quant_shape_to_byte_shape(x.shape, gtype)
        deq = quants.dequantize(packed.numpy(), gtype)
        assert deq.shape == x.shape
        rel = np.sqrt(np.mean((deq - x.numpy()) ** 2) / np.mean(x.numpy() ** 2))
        assert rel < REL_RMS_BOUND[qtype], f"{qtype} seed {seed}: relative RMS error {rel:.4f}"


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_round_trip_keeps_zeros_and_constants(qtype: str) -> None:
    """An all-zero row decodes to zeros; a constant row to (nearly) itself."""
    x = torch.zeros(2, 256)
    x[1] = -0.37
    deq = quants.dequantize(quantize_k(x, qtype).numpy(), GGMLQuantizationType[qtype])
    assert np.all(deq[0] == 0)
    np.testing.assert_allclose(deq[1], -0.37, rtol=2e-3)


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_chunking_does_not_change_the_bytes(qtype: str) -> None:
    x = _case("student_t")  # 7 rows of 512: chunks of 2 rows leave a 1-row tail
    whole = quantize_k(x, qtype)
    assert torch.equal(quantize_k(x, qtype, chunk_elements=1024), whole)
    assert torch.equal(quantize_k(x, qtype, chunk_elements=1), whole)


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_input_dtypes_agree_on_the_same_values(qtype: str) -> None:
    x = _case("bf16_input")
    expected = quantize_k(x.float(), qtype)
    assert torch.equal(quantize_k(x, qtype), expected)
    assert torch.equal(quantize_k(x.double(), qtype), expected)
    assert torch.equal(quantize_k(x.float().T.contiguous().T, qtype), expected)  # non-contiguous


def test_rejects_rows_that_are_not_whole_super_blocks() -> None:
    with pytest.raises(ValueError, match=r"Q4_K.*300.*multiple of 256"):
        quantize_k(torch.zeros(2, 300), "Q4_K")
    with pytest.raises(ValueError, match="2-D"):
        quantize_k(torch.zeros(256), "Q6_K")
    with pytest.raises(ValueError, match="unknown K-quant type"):
        quantize_k(torch.zeros(1, 256), "Q4_0")
    with pytest.raises(ValueError, match="float"):
        quantize_k(torch.zeros(1, 256, dtype=torch.int32), "Q2_K")


def test_empty_tensor() -> None:
    assert quantize_k(torch.zeros(0, 512), "Q5_K").shape == (0, 2 * BLOCK_BYTES["Q5_K"])


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_bytes_do_not_depend_on_nan_bit_patterns(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks make infinite inverse scales and inf·0 NaNs, which ggml reads back through
    nearest_int's bit trick. x86 NaNs read back as 0; CUDA's canonical NaN (0x7FFFFFFF) would
    not. Simulating CUDA's NaN on CPU must not change a byte."""
    cases = [_case(name) for name in ("tiny", "denormal", "near_min_normal", "zeros")]
    x = torch.cat([case.reshape(-1, 256) for case in cases + [cases[1] * 30]])
    expected = quantize_k(x, qtype)
    real = kquants._nearest_int

    def cuda_like(v: torch.Tensor) -> torch.Tensor:
        bits = v.view(torch.int32).clone()
        bits[v.isnan()] = 0x7FFFFFFF
        return real(bits.view(torch.float32))

    monkeypatch.setattr(kquants, "_nearest_int", cuda_like)
    assert torch.equal(quantize_k(x, qtype), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_cuda_matches_cpu(qtype: str) -> None:
    """Same bytes on CUDA: every op is elementwise or a fixed-order loop, with true divisions."""
    x = torch.cat([_case(name, seed=3).float()[:3, :256] for name in CASES])
    x = torch.cat([x, _case("normal", seed=4).reshape(-1, 256)])
    cpu = quantize_k(x, qtype)
    cuda = quantize_k(x.cuda(), qtype)
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(quantize_k(x.cuda().bfloat16(), qtype).cpu(), quantize_k(x.bfloat16(), qtype))
