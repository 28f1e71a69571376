"""dequantize_nf4: Triton kernel (interpreted on CPU) and torch reference, bit for bit.

The oracle is the definition of NF4 evaluated in float64 (``_definition``), not bitsandbytes:
bitsandbytes' AVX512 CPU kernel is wrong on rows that are not a multiple of the blocksize
(``unsloth_like.host``). Every oracle value is also checked against bitsandbytes wherever
bitsandbytes is right: on CUDA, through its own pure-torch implementation on CPU, and through its
native CPU kernel on aligned rows or on hosts whose kernel the probe found right.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_f  # noqa: E402

from unsloth_like.kernels import dequantize_nf4, dequantize_nf4_reference, nf4_code  # noqa: E402
from unsloth_like.host import bitsandbytes_cpu_probe, cpu_facts, probe_dequantize  # noqa: E402
from unsloth_like.kernels._backend import Backend, select_backend  # noqa: E402
from unsloth_like.testing.bitsandbytes_cpu import bitsandbytes_torch_dequantize_4bit  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(344, 200), (48, 200), (1000, 64), (7, 64)]
needs_triton = pytest.mark.skipif(
    select_backend(torch.ones(1)) is Backend.TORCH and not torch.cuda.is_available(),
    reason="needs Triton (interpreter on CPU or a CUDA device)",
)
IMPLEMENTATIONS = [
    pytest.param(dequantize_nf4_reference, id="reference"),
    pytest.param(dequantize_nf4, id="triton", marks=needs_triton),
]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These tensors are small: torch's intra-op thread pool only adds wake-up latency, which
    grows to ~10 ms per op when the 2 CPU cores are shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _quantize(shape, src_dtype=torch.float32, blocksize=64, nested=True, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * scale).to(src_dtype).to(_device())
    return bnb_f.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested, quant_storage=torch.uint8
    )


def _definition(packed, quant_state, dtype=None):
    """NF4 by its definition, in float64: the 4-bit code table at each nibble (high nibble first)
    times its block's absmax; a nested absmax is ``state2.code[q] * state2.absmax`` rounded to fp32,
    plus the offset, rounded to fp32 again. Products of two fp32 values are exact in float64, so
    rounding each once to fp32 gives what fp32 arithmetic gives; then one cast to ``dtype``."""
    n = math.prod(quant_state.shape)
    data = packed.reshape(-1).view(torch.uint8).cpu().long()
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n]
    code = bnb_f.get_4bit_type("nf4", device="cpu").double()
    if quant_state.nested:
        state2 = quant_state.state2
        q = quant_state.absmax.reshape(-1).cpu().long()
        scale2 = state2.absmax.reshape(-1).cpu().double()[torch.arange(q.numel()) // state2.blocksize]
        absmax = (state2.code.cpu().double()[q] * scale2).float().double()
        absmax = (absmax + torch.as_tensor(quant_state.offset).cpu().double()).float().double()
    else:
        absmax = quant_state.absmax.reshape(-1).cpu().double()
    values = (code[nibbles] * absmax[torch.arange(n) // quant_state.blocksize]).float()
    return values.to(dtype or quant_state.dtype).reshape(quant_state.shape).to(packed.device)


def _with_dtype(quant_state, dtype):
    if dtype is None or dtype == quant_state.dtype:
        return quant_state
    quant_state = copy.copy(quant_state)
    quant_state.dtype = dtype
    return quant_state


def _bitsandbytes(packed, quant_state, dtype=None):
    """bitsandbytes' own dequantisation through its registered op, to ``dtype`` (default: the state's)."""
    quant_state = _with_dtype(quant_state, dtype)
    # An odd last dimension sends bitsandbytes' CPU op to its torch.compile'd fallback; run that
    # eagerly (same maths, the compiled version only fuses it) to save seconds of compilation.
    eager = torch._dynamo.config.patch(disable=True) if packed.device.type == "cpu" else contextlib.nullcontext()
    with eager:
        return bnb_f.dequantize_4bit(packed, quant_state, quant_type="nf4")


def _bitsandbytes_torch(packed, quant_state, dtype=None):
    """bitsandbytes' pure-torch implementation, called directly."""
    quant_state = _with_dtype(quant_state, dtype)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb_f.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    return bitsandbytes_torch_dequantize_4bit(packed, absmax.float(), quant_state.blocksize, "nf4",
                                              quant_state.shape, quant_state.dtype)


def _bitsandbytes_is_right(packed, quant_state) -> bool:
    """Whether bitsandbytes' registered kernel is right for this weight on this host."""
    aligned = quant_state.shape[-1] % quant_state.blocksize == 0
    return packed.device.type != "cpu" or aligned or not bitsandbytes_cpu_probe().wrong


@pytest.fixture(autouse=True)
def _native_bitsandbytes(bnb_routing):
    """bitsandbytes' own registered CPU kernel in this module (the harness reroutes it on hosts
    where it is wrong): ``_oracle`` consults it only where it is right."""
    with bnb_routing.native():
        yield


def _oracle(packed, quant_state, dtype=None):
    """The definition, after checking that bitsandbytes agrees with it wherever it is right."""
    expected = _definition(packed, quant_state, dtype)
    if packed.device.type == "cpu":
        _assert_bit_exact(_bitsandbytes_torch(packed, quant_state, dtype), expected)
    if _bitsandbytes_is_right(packed, quant_state):
        _assert_bit_exact(_bitsandbytes(packed, quant_state, dtype), expected)
    return expected


def _assert_bit_exact(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.device == expected.device
    mismatches = (actual.view(-1) != expected.view(-1)).sum().item()
    assert torch.equal(actual, expected), f"{mismatches} of {expected.numel()} elements differ"


def test_nf4_table_is_bitsandbytes_table():
    assert torch.equal(nf4_code("cpu"), bnb_f.get_4bit_type("nf4", device="cpu"))


BLOCKSIZE_SOURCES = [(blocksize, src) for blocksize in (64, 128, 256) for src in DTYPES]


@functools.lru_cache(maxsize=None)
def _case(shape, src_dtype, blocksize, nested):
    """A quantised weight and its oracle dequantisation to each dtype (shared by both impls)."""
    packed, state = _quantize(shape, src_dtype, blocksize, nested, seed=hash((shape, blocksize)) % 1000)
    return packed, state, {dtype: _oracle(packed, state, dtype) for dtype in DTYPES}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("blocksize, src_dtype", BLOCKSIZE_SOURCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_with_the_nf4_definition(impl, shape, blocksize, src_dtype, nested):
    packed, state, expected = _case(shape, src_dtype, blocksize, nested)
    assert state.dtype == src_dtype and state.nested is nested
    for dtype in DTYPES:
        _assert_bit_exact(impl(packed, state, dtype=dtype), expected[dtype])
    _assert_bit_exact(impl(packed, state), expected[src_dtype])  # default: the state's dtype


def test_bitsandbytes_avx512_cpu_bug_shows_where_it_applies():
    """bitsandbytes' native CPU kernel takes an AVX512 path on CPUs with AVX512F, and that path
    mis-scales rows that are not a multiple of the blocksize. This fails on such a CPU once
    bitsandbytes fixes it: then drop models/nf4_cpu_guard.py and the harness's rerouting."""
    packed, state = _quantize((7, 64), torch.float32, 128, nested=False, scale=1.0)
    error = (_bitsandbytes(packed, state) - _definition(packed, state)).abs().max().item()
    probe = probe_dequantize(_bitsandbytes)  # the native kernel: this module lifts the rerouting
    assert bitsandbytes_cpu_probe() == probe  # what the library saw at start-up
    if cpu_facts().avx512:
        # Against the definition a right kernel is off by exactly 0; the bug mis-scales whole
        # rows, by about the size of the weights (|w| up to ~3.5 here; measured 1.46).
        assert probe.wrong and error > 0.5, (
            f"bitsandbytes {bnb.__version__} dequantises unaligned rows right on this AVX512 CPU now "
            f"(max error {error:.3g}): remove the workaround for its AVX512 bug")
    else:
        assert probe.status == "correct" and error == 0.0
    aligned, aligned_state = _quantize((7, 128), torch.float32, 128, nested=False, scale=1.0)
    _assert_bit_exact(_bitsandbytes(aligned, aligned_state), _definition(aligned, aligned_state))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(5, 7), (9,), (3, 4, 6)], ids=str)
def test_odd_sizes_and_other_ranks(impl, shape):
    # An odd element count leaves a padding nibble in the last byte.
    for nested in (False, True):
        packed, state = _quantize(shape, torch.bfloat16, 32, nested, scale=1.0)
        for dtype in DTYPES:
            _assert_bit_exact(impl(packed, state, dtype=dtype), _oracle(packed, state, dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy cast
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("scale", [1e-6, 3e4], ids=["tiny", "huge"])
def test_extreme_magnitudes(impl, scale):
    # fp16 subnormals for tiny weights; fp16 overflow to inf (and exact bf16 rounding) for huge ones.
    for nested in (False, True):
        packed, state = _quantize((64, 96), torch.float32, 64, nested, scale=scale)
        for dtype in DTYPES:
            _assert_bit_exact(impl(packed, state, dtype=dtype), _oracle(packed, state, dtype))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_blocksizes_beyond_256(impl):
    for blocksize in (32, 512, 4096):
        packed, state = _quantize((40, 200), torch.float16, blocksize, nested=True)
        _assert_bit_exact(impl(packed, state, dtype=torch.bfloat16), _oracle(packed, state, torch.bfloat16))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_flat_packed_and_out_buffer(impl):
    packed, state = _quantize((48, 200), torch.bfloat16, 64, nested=True)
    expected = _oracle(packed, state, torch.float16)
    _assert_bit_exact(impl(packed.reshape(-1), state, dtype=torch.float16), expected)
    out = torch.full((48, 200), float("nan"), dtype=torch.float16, device=packed.device)
    result = impl(packed, state, out=out, dtype=torch.float16)
    assert result is out
    _assert_bit_exact(out, expected)
    out_bf16 = torch.empty((48, 200), dtype=torch.bfloat16, device=packed.device)
    assert impl(packed, state, out=out_bf16) is out_bf16  # dtype defaults to the state's (bf16)
    _assert_bit_exact(out_bf16, _oracle(packed, state))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8], ids=str)
def test_any_quant_storage(impl, storage):
    # FSDP-style QLoRA stores the packed bytes in a tensor of the compute dtype
    # (bnb_4bit_quant_storage); the bytes are the same as with uint8 storage.
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 200, generator=g) * 0.05).to(_device())
    kwargs = dict(blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = bnb_f.quantize_4bit(w, quant_storage=storage, **kwargs)
    packed_u8, _ = bnb_f.quantize_4bit(w, quant_storage=torch.uint8, **kwargs)
    assert packed.dtype == storage and torch.equal(packed.view(torch.uint8).reshape(-1), packed_u8.reshape(-1))
    expected = _oracle(packed_u8, state)
    _assert_bit_exact(impl(packed, state), expected)
    _assert_bit_exact(impl(packed.view(torch.uint8), state), expected)
    if _bitsandbytes_is_right(packed, state):
        _assert_bit_exact(_bitsandbytes(packed, state), expected)
    _assert_bit_exact(_bitsandbytes_torch(packed, state), expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_state_restored_from_a_state_dict(impl):
    # QuantState.from_dict: offset becomes a 0-d tensor, nested fields come back from the dict.
    packed, state = _quantize((48, 200), torch.float32, 64, nested=True)
    restored = bnb_f.QuantState.from_dict(state.as_dict(packed=True), device=packed.device)
    _assert_bit_exact(impl(packed, restored), _oracle(packed, state))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_linear4bit_weight(nested):
    layer = bnb.nn.Linear4bit(
        200, 344, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested, quant_type="nf4",
        quant_storage=torch.uint8,
    ).to(_device())  # moving the layer to a device quantises its weight
    weight = layer.weight
    assert weight.dtype == torch.uint8 and weight.quant_state.nested is nested
    expected = _oracle(weight.data, weight.quant_state)
    _assert_bit_exact(dequantize_nf4_reference(weight.data, weight.quant_state), expected)
    if select_backend(weight.data) is not Backend.TORCH:
        _assert_bit_exact(dequantize_nf4(weight.data, weight.quant_state), expected)
        _assert_bit_exact(dequantize_nf4(weight, weight.quant_state), expected)  # the Params4bit itself


def test_zoo_llama_loaded_in_4bit(zoo_cache):
    from unsloth_like.testing.zoo import load_zoo_model

    model, _ = load_zoo_model("llama", load_in_4bit=True, cache_dir=zoo_cache)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 3 * 7  # q, k, v, o, gate, up, down in each of 3 layers; lm_head skipped
    run_triton = select_backend(layers[0].weight.data) is not Backend.TORCH
    for layer in layers:
        weight = layer.weight
        state = weight.quant_state
        assert state.quant_type == "nf4" and state.nested
        expected = _oracle(weight.data, state)
        assert expected.shape == (layer.out_features, layer.in_features)
        _assert_bit_exact(dequantize_nf4_reference(weight.data, state), expected)
        if run_triton:
            _assert_bit_exact(dequantize_nf4(weight.data, state), expected)


def test_empty_weight():
    packed, state = _quantize((0, 64), torch.float32, 64, nested=False)
    for impl in (dequantize_nf4, dequantize_nf4_reference):
        result = impl(packed, state)
        assert result.shape == (0, 64) and result.dtype == torch.float32


def _bad_cases():
    packed, state = _quantize((48, 64), torch.float32, 64, nested=True)
    plain_packed, plain_state = _quantize((48, 64), torch.float32, 64, nested=False)
    fp4_packed, fp4_state = bnb_f.quantize_4bit(torch.randn(48, 64), blocksize=64, quant_type="fp4")

    def with_(base, **changes):
        changed = copy.copy(base)
        for key, value in changes.items():
            setattr(changed, key, value)
        return changed

    state2_fp16 = with_(state.state2, absmax=state.state2.absmax.half(), dtype=torch.float16)
    repacked = with_(plain_state)
    repacked.packing_format_for_cpu = True
    meta = torch.device("meta")
    return [
        ("fp4", (fp4_packed, fp4_state), {}, "only NF4"),
        ("packed-values-cast", (packed.to(torch.int16), state), {},
         r"packed must hold ceil\(n / 2\) = 1536 bytes .*, got 3072 \(torch.int16 tensor"),
        ("packed-short-storage", (torch.zeros(767, 1, dtype=torch.bfloat16), state), {}, "got 1534"),
        ("packed-bool", (packed.bool(), state), {}, "packed must be the packed 4-bit bytes"),
        ("packed-not-tensor", (packed.tolist(), state), {}, "packed must be a torch.Tensor"),
        ("packed-size", (packed[:-1], state), {}, "packed must hold ceil"),
        ("not-a-state", (packed, object()), {}, "quant_state must be a bitsandbytes QuantState"),
        ("blocksize", (packed, with_(state, blocksize=48)), {}, "quant_state.blocksize must be one of"),
        ("absmax-size", (plain_packed, with_(plain_state, absmax=plain_state.absmax[:-1])), {},
         "quant_state.absmax must hold one value per block"),
        ("absmax-dtype", (plain_packed, with_(plain_state, absmax=plain_state.absmax.long())), {},
         "quant_state.absmax must have dtype"),
        ("nested-absmax-dtype", (packed, with_(state, absmax=state.absmax.float())), {},
         "quant_state.absmax of a nested state must have dtype torch.uint8"),
        ("nested-state2-dtype", (packed, with_(state, state2=state2_fp16)), {}, "quant_state.state2.dtype"),
        ("offset-missing", (packed, with_(state, offset=None)), {}, "quant_state.offset"),
        ("repacked-for-cpu", (plain_packed, repacked), {}, "packing_format_for_cpu"),
        ("dtype", (packed, state), {"dtype": torch.float64}, "dtype must be float32, float16 or bfloat16"),
        ("out-shape", (packed, state), {"out": torch.empty(64, 48)}, r"out must have shape \(48, 64\)"),
        ("out-dtype", (packed, state), {"out": torch.empty(48, 64, dtype=torch.bfloat16)}, "out must have dtype"),
        ("out-dtype-vs-dtype", (packed, state), {"out": torch.empty(48, 64), "dtype": torch.float16},
         "out must have dtype torch.float16"),
        ("out-strided", (packed, state), {"out": torch.empty(64, 48).t()}, "out must be contiguous"),
        ("out-device", (packed, state), {"out": torch.empty(48, 64, device=meta)}, "out on meta"),
        ("packed-device", (packed.to(meta), state), {}, "packed on meta"),
        ("absmax-device", (packed, with_(state, absmax=state.absmax.to(meta))), {}, "quant_state.absmax on meta"),
    ]


@pytest.mark.parametrize("impl", [dequantize_nf4, dequantize_nf4_reference], ids=["triton", "reference"])
def test_bad_input_is_a_clear_value_error(impl):
    if _device() != "cpu":
        pytest.skip("the cases are built on CPU")
    for name, args, kwargs, message in _bad_cases():
        with pytest.raises(ValueError, match=message):
            impl(*args, **kwargs)


@pytest.mark.gpu
def test_cuda_compiled_kernel_matches_bitsandbytes_cuda():
    for shape in [(4096, 11008), (344, 200), (7, 64)]:
        for nested in (False, True):
            packed, state = _quantize(shape, torch.bfloat16, 64, nested)
            assert packed.is_cuda
            for dtype in DTYPES:
                _assert_bit_exact(dequantize_nf4(packed, state, dtype=dtype), _oracle(packed, state, dtype))


@pytest.mark.gpu
def test_cuda_int64_offsets_beyond_2_31_elements():
    # 2**31 + 1024 elements: indices past int32 range. Checked against the reference on the tail.
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    blocksize, n = 64, 2**31 + 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(n // blocksize, device="cuda", generator=g) + 0.5
    state = bnb_f.QuantState(absmax=absmax, shape=torch.Size([n]), blocksize=blocksize, quant_type="nf4",
                             dtype=torch.bfloat16)
    result = dequantize_nf4(packed, state)
    tail = 1 << 20  # a whole number of blocks and bytes
    tail_state = bnb_f.QuantState(absmax=absmax[-tail // blocksize:], shape=torch.Size([tail]), blocksize=blocksize,
                                  quant_type="nf4", dtype=torch.bfloat16)
    expected = dequantize_nf4_reference(packed[-tail // 2:], tail_state)
    _assert_bit_exact(result[-tail:], expected)
