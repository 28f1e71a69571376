"""llama.cpp's K-quants (Q2_K … Q6_K) in PyTorch, byte for byte what ``llama-quantize`` writes.

The targets are ggml's reference quantisers (``quantize_row_qX_K_ref`` in ``ggml-quants.c``),
which ``llama-quantize`` runs for these types when it is given no importance matrix. Every
256-value super-block is split into sub-blocks of 16 or 32 values; each sub-block gets a scale
(and, for Q2/Q4/Q5, a minimum) from a small search, and those are quantised again against one
fp16 super-scale per block.

Why this code looks the way it does:

* It is vectorised over all sub-blocks of a chunk of rows at once; the Python loops run only over
  the fixed inner dimensions (the 16/32 values of a sub-block, the candidate scales), so the same
  code runs on CPU and CUDA and its cost per value does not depend on the tensor size.
* Bit-exactness. ggml does all of this in float32, one operation at a time, and the search keeps
  a candidate only when its error is *strictly* smaller, so one different last bit can change a
  stored scale. Hence:
  - sums that feed a decision or a stored value are accumulated one term at a time in ggml's
    order (``_seq_sum``), never with ``torch.sum`` (which reassociates);
  - products are formed in ggml's association order (``(w*l)*x``, not ``w*(l*x)``);
  - every division is a true float32 division of two tensors on the device: PyTorch turns
    ``tensor / python_float`` into a multiplication by the reciprocal on CUDA and evaluates
    ``python_float / tensor`` as ``reciprocal(tensor) * python_float``, both of which round
    differently from ggml (dividing by a power of two is the one safe exception);
  - constants such as ``rmin + rdelta*is + nmax`` are formed in float32 (numpy scalars), as C
    forms them from float literals;
  - ``nearest_int`` is emulated bit for bit (the 1.5·2^23 trick) instead of ``torch.round``;
  - square roots are taken in float64 and rounded, since torch's float32 CPU sqrt is not
    correctly rounded and ``sqrtf`` is;
  - integers that C stores into ``uint8_t``/``int8_t`` fields are wrapped the way C wraps them.
  The ggml library that llama-cpp-python builds targets plain x86-64 (no FMA), so C does not fuse
  multiply-adds either; nothing here uses fused ops (``addcmul``, ``alpha=``) for that reason.
  (A llama.cpp compiled where the compiler contracts ``a*b + c`` into an FMA, as on ARM, can
  itself differ from its x86 build in rare last-bit decisions; x86 ggml is the reference.)
* Scope of the guarantee: finite inputs whose super-scales fit in fp16. For NaN/inf inputs ggml's
  result depends on the NaN bit patterns of the hardware, so CPU and CUDA may differ there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

K_QUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

QK_K = 256  # values per super-block
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# ggml's threshold below which a group counts as all zero (a float literal, so float32).
_GROUP_MAX_EPS = float(np.float32(1e-15))

# Values quantised per chunk of rows (whole rows; at least one). The work arrays take 40-70 bytes
# per value (measured peak, Q4_K/Q6_K being the largest), so the extra memory is bounded by the
# chunk, not the tensor. The cost is dominated by the ~2000-3500 small ops per chunk: on a CPU,
# 2^18 values (~1 MiB of float32, ~12 MiB of temporaries) keep them in cache and run fastest;
# on a GPU each op is a kernel launch, so a chunk of 2^22 values (16 MiB of float32, ~200-300 MiB
# of temporaries) is what it takes for the launches not to dominate.
CPU_CHUNK_ELEMENTS = 1 << 18
CUDA_CHUNK_ELEMENTS = 1 << 22


def quantize_k(weights: Tensor, qtype: str, *, chunk_elements: int | None = None) -> Tensor:
    """Quantise a 2-D weight matrix row by row into ggml's K-quant blocks.

    ``weights``: (rows, n_per_row), any float dtype, any device; ``n_per_row`` must be a multiple
    of 256. Returns ``uint8`` (rows, n_per_row // 256 * block_bytes) on the same device, each row
    the consecutive ``block_qX_K`` structs ggml would write (little-endian fp16 fields).
    ``chunk_elements`` (values per chunk of rows) trades memory for speed; the bytes do not
    depend on it.
    """
    _validate(weights, qtype)
    rows, n_per_row = weights.shape
    row_bytes = n_per_row // QK_K * BLOCK_BYTES[qtype]
    out = torch.empty((rows, row_bytes), dtype=torch.uint8, device=weights.device)
    if chunk_elements is None:
        chunk_elements = CUDA_CHUNK_ELEMENTS if weights.device.type == "cuda" else CPU_CHUNK_ELEMENTS
    step = max(1, chunk_elements // n_per_row)
    quantize_blocks = _QUANTIZERS[qtype]
    with torch.no_grad():
        for start in range(0, rows, step):
            # Blocks never straddle rows (n_per_row % 256 == 0), so a chunk of rows is just more blocks.
            blocks = weights[start:start + step].to(torch.float32).reshape(-1, QK_K)
            out[start:start + step] = quantize_blocks(blocks).view(-1, row_bytes)
    return out


def _validate(weights: Tensor, qtype: str) -> None:
    if qtype not in K_QUANT_TYPES:
        raise ValueError(f"unknown K-quant type {qtype!r}; expected one of {', '.join(K_QUANT_TYPES)}")
    if weights.ndim != 2:
        raise ValueError(f"{qtype} quantises 2-D (rows, n_per_row) tensors, got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise ValueError(f"{qtype} quantises float tensors, got {weights.dtype}")
    n_per_row = weights.shape[1]
    if n_per_row % QK_K:
        raise ValueError(
            f"{qtype} packs rows in super-blocks of {QK_K} values, but the row length {n_per_row} "
            f"is not a multiple of {QK_K}")
    if sys.byteorder != "little":  # the fp16 fields are written by reinterpreting memory
        raise RuntimeError("K-quant packing assumes a little-endian host")


# --------------------------------------------------------------------------- float32 primitives


def _nearest_int(v: Tensor) -> Tensor:
    """ggml's ``nearest_int``: adding 1.5·2^23 in float32 makes the FPU round (half to even) into
    the low mantissa bits, which are read back as an int32. Emulated literally rather than with
    ``torch.round`` so that out-of-range values (an infinite inverse scale on a sub-block of
    denormals) land where ggml's do."""
    return ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _nearest_int_nan0(v: Tensor) -> Tensor:
    """``_nearest_int`` for the quantisation of sub-block scales by the super-block's inverse
    scale, which is infinite for a block of denormals, so that inf·0 gives NaN. The NaNs x86
    produces read back as 0; a GPU's canonical NaN would read back as 4194303. Mapping NaN to 0
    first gives x86 ggml's result on every device (these arrays are small: one value per
    sub-block)."""
    return _nearest_int(torch.where(v.isnan(), 0.0, v))


def _quant(v: Tensor, lo: int, hi: int) -> Tensor:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32: small integers are exact in float32, and
    the search multiplies them with float weights straight away."""
    return _nearest_int(v).clamp_(lo, hi).to(torch.float32)


def _seq_sum(terms: Tensor, from_zero: bool = True) -> Tensor:
    """Sum over axis 0 left to right, as ``float s = 0; for (...) s += t;`` does. Starting from
    ``t0 + 0`` keeps C's sign of zero (``0.0f + -0.0f`` is ``+0``); ``from_zero=False`` is for
    the loops that C starts at the first term. Several independent sums can share the loop
    (``terms`` of shape (n, k, M)): each keeps its own order, and there are k times fewer ops."""
    acc = terms[0] + 0.0 if from_zero else terms[0].clone()
    for term in terms[1:]:
        acc += term
    return acc


def _first_absmax(v: Tensor) -> tuple[Tensor, Tensor]:
    """Over axis 0: the largest ``|v|`` and the signed value where it first occurs, starting from
    0 and replacing only on a strict ``>``, which fixes which of two tied values ggml keeps."""
    amax = torch.zeros_like(v[0])
    value = torch.zeros_like(v[0])
    for row in v:
        a = row.abs()
        take = a > amax
        amax = torch.where(take, a, amax)
        value = torch.where(take, row, value)
    return amax, value


def _positive_max(v: Tensor) -> Tensor:
    """Per row, ``max(0, max(v))`` with a ``+0`` when nothing is positive, like ggml's running
    ``if (s > max) max = s`` from 0 (a ``-0`` would flip the sign bit of an fp16 zero scale)."""
    m = v.amax(dim=1)
    return torch.where(m > 0, m, 0.0)


def _consts(values: list[float], like: Tensor) -> Tensor:
    """float32 constants on ``like``'s device, so divisions by/of them stay true divisions."""
    return torch.tensor(np.asarray(values, dtype=np.float32), device=like.device)


def _f32(v: float) -> np.float32:
    return np.float32(v)


def _products(n_sums: int, like: Tensor) -> Tensor:
    """An (n, n_sums, M) buffer that the terms of ``n_sums`` sums over ``like``'s axis 0 are
    written into (``out=``), so that one ``_seq_sum`` accumulates them all."""
    return like.new_empty((like.shape[0], n_sums, like.shape[1]))


def _columns(blocks: Tensor, size: int) -> Tensor:
    """(B, 256) → (size, M): sub-block values along axis 0, so that value ``i`` of every sub-block
    is one contiguous vector for the sequential loops."""
    return blocks.reshape(-1, size).T.contiguous()


def _wrap_i8(v: Tensor) -> Tensor:
    """The value an ``int`` has once stored into an ``int8_t``."""
    return ((v + 128) & 0xFF) - 128


def _sqrt(v: Tensor) -> Tensor:
    """Correctly rounded float32 square root, like C's ``sqrtf``. torch's CPU float32 sqrt is
    not (1 ulp off for a sizeable fraction of inputs, which changed Q4_K weights and then a
    stored scale). A float64 root rounded to float32 is: the root of a float32 never lies within
    2^-50 (relatively) of a float32 rounding midpoint, far more than float64's error."""
    return torch.sqrt(v.double()).float()


def _fp16(v: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16 is round-to-nearest-even, as is torch's cast."""
    return v.to(torch.float16)


def _fp16_bytes(h: Tensor) -> Tensor:
    return h.reshape(-1, 1).view(torch.uint8)


# --------------------------------------------------------------------------- scale searches


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Scale and minimum of each sub-block (columns of ``x``, ``w``: (n, M)) for ``x ≈ s·L - m``,
    L in [0, nmax]: start from the min/max fit, then try ``nstep + 1`` stretched inverse scales,
    refit (s, m) by weighted least squares on each rounding and keep it if its weighted error
    (absolute or squared) is strictly smaller. Returns (L float32 (n, M), scale (M,), the_min (M,)).
    """
    lo = x.amin(dim=0)
    hi = x.amax(dim=0)
    lo = torch.where(lo > 0, 0.0, lo)  # the offset only ever moves values up
    flat = hi == lo
    start_min = lo
    terms = _products(3, x)
    terms[:, 0].copy_(w)
    torch.mul(w, x, out=terms[:, 1])
    sum_w, sum_x = _seq_sum(terms[:, :2], from_zero=False)

    def error(scale: Tensor, levels: Tensor, mn: Tensor) -> Tensor:
        diff = scale * levels + mn - x
        return _seq_sum(w * (diff.abs() if use_mad else diff * diff))

    def levels_for(iscale: Tensor, mn: Tensor) -> Tensor:
        # A range below ~1e-38 (denormals) makes the inverse scale infinite. In ggml every level of
        # such a sub-block then rounds to 0: ±inf reads back out of range and is clamped, and the
        # minimum itself gives inf·0 = NaN, whose x86 bit pattern also reads back as 0. A GPU's
        # canonical NaN would not, so the infinite inverse scale is replaced by 0: same levels.
        iscale = torch.where(iscale.isinf(), 0.0, iscale)
        return _quant(iscale * (x - mn), 0, nmax)

    numerators = [_f32(nmax), _f32(1.0)]
    numerators += [_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax) for step in range(nstep + 1)]
    c = _consts(numerators, x)
    iscale = c[0] / (hi - lo)
    scale = c[1] / iscale
    levels = levels_for(iscale, lo)
    best = error(scale, levels, lo)
    mn = lo
    for step in range(nstep + 1):
        # ggml reuses the best minimum found so far both in the range and in the offset.
        trial = levels_for(c[2 + step] / (hi - mn), mn)
        wl = torch.mul(w, trial, out=terms[:, 0])
        torch.mul(wl, trial, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seq_sum(terms)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0  # a positive offset is not representable: refit the scale alone
        this_min = torch.where(clipped, 0.0, this_min)
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, trial, this_min)
        better = (det > 0) & (cur < best)
        levels = torch.where(better, trial, levels)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    levels = torch.where(flat, 0.0, levels)
    scale = torch.where(flat, 0.0, scale)
    mn = torch.where(flat, start_min, mn)
    return levels, scale, -mn


def _make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric scale of each sub-block (columns of ``x``) for ``x ≈ s·(L - nmax)``, weighted by
    ``x²``: least-squares scale for the max-based rounding, then for 18 nudged inverse scales,
    keeping strict improvements. Returns (L in [0, 2·nmax) as float32, scale)."""
    amax, vmax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    terms = _products(2, x)

    def trial(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = _quant(iscale * x, -nmax, nmax - 1)
        torch.mul(wx, q, out=terms[:, 0])
        torch.mul(torch.mul(w, q, out=terms[:, 1]), q, out=terms[:, 1])
        sumlx, suml2 = _seq_sum(terms)
        return q, sumlx, suml2

    nudges = [step for step in range(-9, 10) if step]
    c = _consts([-_f32(nmax)] + [-(_f32(nmax) + _f32(0.1) * _f32(step)) for step in nudges], x)
    levels, sumlx, suml2 = trial(c[0] / vmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for k in range(1, len(nudges) + 1):
        q, slx, sl2 = trial(c[k] / vmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, q, levels)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    levels = torch.where(zero, 0.0, levels + nmax)
    return levels, torch.where(zero, 0.0, scale)


def _make_q3_quants(x: Tensor, nmax: int = 4, rounds: int = 5) -> tuple[Tensor, Tensor]:
    """Q3_K's sub-block search: round against the max, then up to ``rounds`` passes of coordinate
    descent that move one value at a time to the level that raises the ``x²``-weighted fit
    ``sumlx²/suml2``. A pass that changes nothing leaves the state as it was, so running all passes
    for every sub-block equals ggml's early exit. Returns (L in [0, 2·nmax) as float32, scale)."""
    amax, vmax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    c = _consts([-float(nmax)], x)
    levels = _quant(c[0] / vmax * x, -nmax, nmax - 1)
    sumlx, suml2 = _seq_sum(torch.stack([wx * levels, w * levels * levels], dim=1))
    for _ in range(rounds):
        for i in range(x.shape[0]):
            old = levels[i]
            slx = sumlx - wx[i] * old
            sl2 = suml2 - w[i] * old * old
            new = _quant(x[i] * sl2 / slx, -nmax, nmax - 1)
            new_slx = slx + wx[i] * new
            new_sl2 = sl2 + w[i] * new * new
            take = ((slx > 0) & (new != old) & (new_sl2 > 0)
                    & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2))
            levels[i] = torch.where(take, new, old)
            sumlx = torch.where(take, new_slx, sumlx)
            suml2 = torch.where(take, new_sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, levels + nmax), torch.where(zero, 0.0, scale)


def _requantize(levels: Tensor, d: Tensor, quantized: Tensor) -> Tensor:
    """Where a sub-block's decoded scale is 0 ggml skips it and keeps the search's levels."""
    return torch.where((d != 0).unsqueeze(-1), quantized, levels).to(torch.int32)


def _sub_block_levels(levels: Tensor, n_blocks: int, size: int) -> Tensor:
    """(size, M) search levels back to (B, 256 // size, size)."""
    return levels.T.reshape(n_blocks, QK_K // size, size)


# --------------------------------------------------------------------------- bit packing


def _pack_2bit(q: Tensor) -> Tensor:
    """Values 32 apart share a byte, two bits each; 64 bytes per 256 values."""
    q = q.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_4bit(q: Tensor) -> Tensor:
    """Each 64 values: the first 32 in the low nibbles, the next 32 in the high ones."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _bit_planes(bits: Tensor) -> Tensor:
    """(B, k, 32) single bits → (B, 32) bytes with plane ``j`` in bit ``j``."""
    out = bits[:, 0]
    for j in range(1, bits.shape[1]):
        out = out | (bits[:, j] << j)
    return out


def _pack_k4_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes (ggml's get_scale_min_k4
    layout): sub-blocks 0-3 whole in bytes 0-7, 4-7 as nibbles in bytes 8-11 with their top two
    bits in the spare high bits of bytes 0-7."""
    low = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)], dim=1)
    return torch.cat([low, (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)


def _pack_q3_scales(l6: Tensor) -> Tensor:
    """Q3_K: sixteen 6-bit scales in 12 bytes: low nibbles two per byte (j and j+8), the high
    two bits of scale 4g+k in bits 2g..2g+1 of byte 8+k."""
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = l6.reshape(-1, 4, 4) >> 4
    return torch.cat([low, high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)], dim=1)


def _bytes(*parts: Tensor) -> Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1)


# --------------------------------------------------------------------------- the five types


def _quantize_q2_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = _columns(blocks, 16)
    levels, scales, mins = _make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.view(n, 16), mins.view(n, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    c15 = _consts([15.0], blocks)[0]
    has_scale, has_min = (max_scale > 0).unsqueeze(1), (max_min > 0).unsqueeze(1)
    ls = torch.where(has_scale, _nearest_int_nan0((c15 / max_scale).unsqueeze(1) * scales), 0)
    lm = _nearest_int_nan0((c15 / max_min).unsqueeze(1) * mins)
    packed = torch.where(has_min, ls | (lm * 16), ls) & 0xFF  # scale in the low nibble, min above
    d = _fp16(torch.where(max_scale > 0, max_scale / c15, 0.0))
    dmin = _fp16(torch.where(max_min > 0, max_min / c15, 0.0))
    sub_d = d.float().unsqueeze(1) * (packed & 0xF).float()
    sub_m = dmin.float().unsqueeze(1) * (packed >> 4).float()
    xs = blocks.view(n, 16, 16)
    q = _nearest_int((xs + sub_m.unsqueeze(-1)) / sub_d.unsqueeze(-1)).clamp_(0, 3)
    q = _requantize(_sub_block_levels(levels, n, 16), sub_d, q)
    return _bytes(packed, _pack_2bit(q), _fp16_bytes(d), _fp16_bytes(dmin))


def _quantize_q3_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    levels, scales = _make_q3_quants(_columns(blocks, 16))
    scales = scales.view(n, 16)
    _, max_scale = _first_absmax(scales.T)
    has_scale = max_scale != 0
    c = _consts([-32.0, 1.0], blocks)
    iscale = c[0] / max_scale
    l6 = _wrap_i8(_nearest_int_nan0(iscale.unsqueeze(1) * scales)).clamp_(-32, 31) + 32
    l6 = torch.where(has_scale.unsqueeze(1), l6, 0)
    d = _fp16(torch.where(has_scale, c[1] / iscale, 0.0))
    sub_d = d.float().unsqueeze(1) * (l6 - 32).float()
    xs = blocks.view(n, 16, 16)
    q = _nearest_int(xs / sub_d.unsqueeze(-1)).clamp_(-4, 3) + 4
    q = _requantize(_sub_block_levels(levels, n, 16), sub_d, q).reshape(n, QK_K)
    hmask = _bit_planes((q >> 2).view(n, 8, 32))  # bit 2 of value j goes to byte j%32, bit j//32
    return _bytes(hmask, _pack_2bit(q & 3), _pack_q3_scales(l6), _fp16_bytes(d))


def _quantize_q45_k(blocks: Tensor, nmax: int, rmin: float, nstep: int) -> tuple[Tensor, ...]:
    """Shared by Q4_K and Q5_K: returns (levels (B, 256), packed scales, d, dmin)."""
    n = blocks.shape[0]
    x = _columns(blocks, 32)
    av_x = _sqrt(_seq_sum(x * x) / 32)  # RMS of the sub-block (÷32 is exact either way)
    weights = av_x + x.abs()
    levels, scales, mins = _make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    c63 = _consts([63.0], blocks)[0]
    inv_scale = torch.where(max_scale > 0, c63 / max_scale, 0.0).unsqueeze(1)
    inv_min = torch.where(max_min > 0, c63 / max_min, 0.0).unsqueeze(1)
    ls = (_nearest_int_nan0(inv_scale * scales) & 0xFF).clamp_(max=63)  # stored via uint8_t, then capped
    lm = (_nearest_int_nan0(inv_min * mins) & 0xFF).clamp_(max=63)
    d, dmin = _fp16(max_scale / c63), _fp16(max_min / c63)
    sub_d = d.float().unsqueeze(1) * ls.float()
    sub_m = dmin.float().unsqueeze(1) * lm.float()
    xs = blocks.view(n, 8, 32)
    q = _nearest_int((xs + sub_m.unsqueeze(-1)) / sub_d.unsqueeze(-1)).clamp_(0, nmax)
    q = _requantize(_sub_block_levels(levels, n, 32), sub_d, q).reshape(n, QK_K)
    return q, _pack_k4_scales(ls, lm), d, dmin


def _quantize_q4_k(blocks: Tensor) -> Tensor:
    q, scales, d, dmin = _quantize_q45_k(blocks, nmax=15, rmin=-1.0, nstep=20)
    return _bytes(_fp16_bytes(d), _fp16_bytes(dmin), scales, _pack_4bit(q))


def _quantize_q5_k(blocks: Tensor) -> Tensor:
    q, scales, d, dmin = _quantize_q45_k(blocks, nmax=31, rmin=-0.5, nstep=15)
    qh = _bit_planes((q >> 4).view(-1, 8, 32))  # 5th bit of value 32k+j: byte j, bit k
    return _bytes(_fp16_bytes(d), _fp16_bytes(dmin), scales, qh, _pack_4bit(q & 0xF))


def _quantize_q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    levels, scales = _make_qx_quants(_columns(blocks, 16), 32)
    scales = scales.view(n, 16)
    max_abs, max_scale = _first_absmax(scales.T)
    c = _consts([-128.0, 1.0], blocks)
    iscale = c[0] / max_scale
    d = _fp16(c[1] / iscale)
    sc = _wrap_i8(_nearest_int_nan0(iscale.unsqueeze(1) * scales).clamp_(max=127))
    sub_d = d.float().unsqueeze(1) * sc.float()
    xs = blocks.view(n, 16, 16)
    q = _nearest_int(xs / sub_d.unsqueeze(-1)).clamp_(-32, 31) + 32
    q = _requantize(_sub_block_levels(levels, n, 16), sub_d, q).view(n, 2, 4, 32)
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    out = _bytes(ql, qh, sc & 0xFF, _fp16_bytes(d))
    # A block whose scales are all (nearly) zero is written as all-zero bytes.
    return torch.where((max_abs < _GROUP_MAX_EPS).unsqueeze(1), 0, out).to(torch.uint8)


_QUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q2_K": _quantize_q2_k,
    "Q3_K": _quantize_q3_k,
    "Q4_K": _quantize_q4_k,
    "Q5_K": _quantize_q5_k,
    "Q6_K": _quantize_q6_k,
}
