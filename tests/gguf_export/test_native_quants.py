"""The C quantisers (``quants.c`` through ``native.py``): the same bytes as the torch K-quants, the
``gguf`` package's numpy quantisers and llama.cpp, for every type they write; their build, its
cache and the fallback when there is no C compiler.

The data cases are test_kquants.py's (zeros, constants, outliers, denormals, rounding ties, bf16
and fp16 inputs, ...), plus rows whose blocks span the fp16 range of the stored scales.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from unsloth_like.save.gguf import native
from unsloth_like.save.gguf.kquants import K_QUANT_TYPES, quantize_k
from unsloth_like.save.gguf.quantize import tensor_bytes
from unsloth_like.testing import llamacpp

from .test_kquants import CASES, _case, needs_llamacpp

needs_compiler = pytest.mark.skipif(not native.available(),
                                    reason="no C compiler here: the C quantisers cannot be built")
TYPE_NAMES = sorted(t.name for t in native.TYPES)


def _scale_sweep() -> torch.Tensor:
    """One 256-value block per power of two from 2^-40 to 2^23: stored scales that are fp16
    subnormals, normals, and too large for fp16 (infinity), through every quantiser."""
    g = torch.Generator().manual_seed(3)
    powers = torch.arange(-40, 24, dtype=torch.float32)
    return torch.randn(len(powers), 256, generator=g) * torch.exp2(powers).unsqueeze(1)


def _data(case: str) -> torch.Tensor:
    return _scale_sweep() if case == "scale_sweep" else _case(case)


def _reference(x: torch.Tensor, qtype: T) -> np.ndarray:
    """What the pure-Python paths write: the torch K-quants, the gguf package's numpy code."""
    if qtype.name in K_QUANT_TYPES:
        return quantize_k(x, qtype.name).numpy()
    with np.errstate(all="ignore"):  # the numpy code divides by zero on all-zero blocks, by design
        return quants.quantize(x.float().numpy(), qtype)


def _assert_same(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ours, ref = ours.reshape(-1), ref.reshape(-1)
    assert ours.size == ref.size, f"{what}: {ours.size} bytes vs {ref.size}"
    bad = np.flatnonzero(ours != ref)
    assert not bad.size, f"{what}: {bad.size} bytes differ, first at {bad[0]}: {ours[bad[0]]} vs {ref[bad[0]]}"


@needs_compiler
@pytest.mark.parametrize("case", [*CASES, "scale_sweep"])
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_bytes_match_the_python_quantisers(type_name: str, case: str) -> None:
    qtype = T[type_name]
    x = _data(case)
    _assert_same(native.quantize(x, qtype), _reference(x, qtype), f"{type_name} {case} vs torch/numpy")


@needs_compiler
@needs_llamacpp
@pytest.mark.parametrize("case", [*CASES, "scale_sweep"])
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_bytes_match_llamacpp(type_name: str, case: str) -> None:
    x = _data(case)
    ref = np.frombuffer(llamacpp.ggml_quantize(x.float().numpy(), type_name), dtype=np.uint8)
    _assert_same(native.quantize(x, T[type_name]), ref, f"{type_name} {case} vs llama.cpp")


@needs_compiler
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q3_K"])
def test_threads_and_pieces_do_not_change_the_bytes(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    qtype = T[type_name]
    x = _case("student_t")  # 7 rows: uneven pieces
    whole = native.quantize(x, qtype)
    monkeypatch.setattr(native, "_FLOAT32_BYTES_IN_FLIGHT", 4 * x.shape[1])  # one row per piece
    old_threads = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            _assert_same(native.quantize(x, qtype), whole, f"{type_name} with {threads} threads, one row per piece")
    finally:
        torch.set_num_threads(old_threads)


@needs_compiler
def test_shapes_dtypes_and_devices_of_the_input() -> None:
    x = _case("normal")  # 33 x 768
    flat = native.quantize(x, T.Q4_K)
    assert flat.dtype == np.uint8 and flat.shape == (33, 768 // 256 * 144)
    stacked = native.quantize(x[:32].reshape(4, 8, 768), T.Q4_K)  # leading dimensions are kept
    assert stacked.shape == (4, 8, 432)
    _assert_same(stacked, flat[:32], "3-D input")
    _assert_same(native.quantize(x.T.contiguous().T, T.Q4_K), flat, "non-contiguous input")
    half = x.half()
    _assert_same(native.quantize(half, T.Q8_0), native.quantize(half.float(), T.Q8_0), "fp16 input")


@needs_compiler
def test_tensor_bytes_takes_the_c_path_on_cpu_and_agrees_with_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _case("outlier")
    calls = []
    quantize = native.quantize
    monkeypatch.setattr(native, "quantize", lambda t, q, *rest: calls.append(q.name) or quantize(t, q, *rest))
    for type_name in TYPE_NAMES:
        fast = tensor_bytes(x, T[type_name])
        with monkeypatch.context() as without_c:
            without_c.setattr(native, "available", lambda: False)
            slow = tensor_bytes(x, T[type_name])
        _assert_same(fast, slow, f"{type_name}: C path vs fallback")
    assert calls == TYPE_NAMES  # the C path ran once per type, the fallback never


@needs_compiler
def test_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match=r"Q4_K packs rows in whole blocks, but the row length 300"):
        native.quantize(torch.zeros(2, 300), T.Q4_K)
    with pytest.raises(ValueError, match=r"Q8_0 packs rows in whole blocks, but the row length 33"):
        native.quantize(torch.zeros(2, 33), T.Q8_0)
    with pytest.raises(ValueError, match=r"do not write GGML type F16"):
        native.quantize(torch.zeros(2, 256), T.F16)


@needs_compiler
def test_build_is_cached_and_keyed_by_compiler(tmp_path) -> None:
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left behind
    lib = native._load(first)
    assert lib.ul_row_bytes(int(T.Q6_K), 512) == 420 and lib.ul_row_bytes(int(T.F16), 512) == 0


def test_without_a_compiler_the_build_says_what_to_install(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(RuntimeError, match=r"no C compiler was found .*install one \(e\.g\. `apt install gcc`\)"):
        native.build(tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_failing_compiler_is_reported_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"compiling quants\.c with /bin/false failed"):
        native.build(tmp_path, compiler="/bin/false")
    assert not any(tmp_path.iterdir())


def test_library_falls_back_with_one_warning(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "cache_directory", lambda: tmp_path)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    native._build_and_load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.library() is None and native.library() is None and not native.available()
        warnings = [r.getMessage() for r in caplog.records if r.name == native.__name__]
        assert len(warnings) == 1 and "falls back to the torch/numpy quantisers" in warnings[0]
        assert "no C compiler was found" in warnings[0]
        assert native.describe().startswith("torch/numpy, 3-5x slower: no C compiler was found")
        x = _case("normal")
        _assert_same(tensor_bytes(x, T.Q4_K), _reference(x, T.Q4_K), "fallback Q4_K")
        _assert_same(tensor_bytes(x, T.Q5_1), _reference(x, T.Q5_1), "fallback Q5_1")
    finally:
        native._build_and_load.cache_clear()
