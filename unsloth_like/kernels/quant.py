"""NF4 dequantisation of bitsandbytes 4-bit weights, bit for bit by the definition of NF4.

A ``Params4bit`` weight of ``n`` elements is a uint8 tensor of ``ceil(n / 2)`` bytes (shape
``(ceil(n / 2), 1)``) plus a ``QuantState``. Element ``e`` of the flattened weight lives in byte
``e // 2``: even ``e`` in the high nibble (``byte >> 4``), odd ``e`` in the low one
(``byte & 0xF``); for odd ``n`` the last low nibble is padding. The nibble indexes the fixed
16-entry NF4 table, and the weight is scaled by the absmax of its block of ``blocksize``
consecutive elements (the flattened weight is blocked; rows do not matter).

The arithmetic is the definition, ``(T)(nf4(q) * absmax)`` with an fp32 absmax, which is what
bitsandbytes' CUDA kernel, its pure-torch implementation and its scalar CPU kernel compute (tests
check it against a float64 evaluation, and against bitsandbytes wherever bitsandbytes is right).
Its AVX512 CPU kernel is not: it mis-scales rows that are not a multiple of the blocksize
(``unsloth_like.host`` detects it).

1. Block absmax, in fp32. Without double quantisation it is ``quant_state.absmax`` (cast to
   fp32). With it (``quant_state.nested``), ``quant_state.absmax`` holds uint8 codes of
   ``absmax - offset`` quantised blockwise with ``state2``, and the absmax is
   ``fp32(state2.code[q] * state2.absmax[i // state2.blocksize])`` rounded to fp32, *then*
   ``+ offset`` rounded to fp32 again: two separate roundings, never a fused multiply-add
   (bitsandbytes runs them as two ops: ``dequantize_blockwise`` then ``absmax += offset``).
2. ``NF4[nibble] * absmax`` in fp32 (one rounding), then one round-to-nearest-even cast to the
   output dtype.

``quant_state.code`` is *not* used for the 4-bit values: bitsandbytes' kernels use the fixed NF4
table whatever the state carries, and so do we (``NF4_CODE`` below). ``state2.code`` (the 8-bit
dynamic map of the nested absmax) is read from the state, as bitsandbytes does.

The Triton kernel does all of it in one launch: each program dequantises a run of output
elements, unpacking nibbles and, for nested states, the absmax of each element's block on the
fly (gathers from the small absmax tensors stay in cache). Two details keep it bit-exact:

* it is launched with ``enable_fp_fusion=False``, so the compiler cannot contract
  ``code2 * absmax2 + offset`` into an FMA (which rounds once instead of twice);
* bf16 output is rounded to nearest-even with integer ops on the fp32 bits, because Triton's
  interpreter truncates fp32 -> bf16 (its "rtne" mode rounds half up and drops the carry);
  compiled Triton would round correctly, but one code path for both keeps them identical.
  fp32 -> fp16 casts are already round-to-nearest-even on both.

``packed`` may have any ``quant_storage`` dtype (bitsandbytes' ``bnb_4bit_quant_storage``; FSDP
needs it to be the compute dtype): the bytes are what count, and they are read through a uint8 view.

The result always has ``quant_state.shape``. (bitsandbytes additionally transposes the output
when ``packed.shape[0] == 1``, a backwards-compatibility shim for a legacy packed layout; that
case never arises for ``Params4bit`` weights of more than two elements and is not copied.)
"""

from __future__ import annotations

import math

import torch

from ._backend import Backend, interpreter_enabled, register_op, select_backend
from ._common import FLOAT_DTYPES, check_float_tensor, check_same_device, tl, triton

register_op("dequantize_nf4", "bitsandbytes NF4 (optionally double-quantised) weights to fp32/bf16/fp16, bit-exact")

# The NF4 data type (QLoRA, Dettmers et al. 2023): the 16 fp32 values bitsandbytes hard-codes.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts

_nf4_tables: dict[torch.device, torch.Tensor] = {}
_nf4_byte_tables: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as an fp32 tensor on ``device`` (cached per device; do not modify it)."""
    device = torch.device(device)
    table = _nf4_tables.get(device)
    if table is None:
        table = _nf4_tables[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return table


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------


def nf4_byte_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2) fp32: row ``b`` holds the codes of byte ``b``'s high and low nibbles (cached per
    device; do not modify it)."""
    device = torch.device(device)
    table = _nf4_byte_tables.get(device)
    if table is None:
        code = nf4_code(device)
        byte = torch.arange(256, device=device)
        table = _nf4_byte_tables[device] = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)
    return table


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch NF4 dequantisation (the CPU path and the documentation of the maths).

    Element 2i is the high nibble of byte i, element 2i+1 its low nibble; each element's value is
    its code times its block's absmax, multiplied in fp32 and rounded once to the output dtype.
    A byte is decoded with one lookup of both its codes (``nf4_byte_table``), the fastest way in
    torch (``index_select``, 2.5x faster than advanced indexing here): splitting the nibbles first would
    take four passes and an int64 copy of every element.
    """
    plan = _validate(packed, quant_state, out, dtype)
    n, blocksize = plan.n, plan.blocksize
    if n == 0:
        return _finish(torch.empty(plan.shape, dtype=plan.dtype, device=packed.device), out)
    values = nf4_byte_table(packed.device).index_select(0, plan.bytes.int()).view(-1)[:n]  # fp32, fresh
    absmax = _block_absmax_reference(quant_state, plan)  # fp32, one per block
    n_blocks = absmax.numel()
    if n == n_blocks * blocksize:
        scaled = values.view(n_blocks, blocksize).mul_(absmax.view(-1, 1)).view(-1)  # fp32 product
    else:  # a last, partial block
        padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=packed.device)
        padded[:n] = values
        scaled = (padded.view(n_blocks, blocksize) * absmax.view(-1, 1)).view(-1)[:n]
    return _finish(scaled.to(plan.dtype).view(plan.shape), out)  # one round-to-nearest-even cast


def _block_absmax_reference(quant_state, plan) -> torch.Tensor:
    if not plan.nested:
        return quant_state.absmax.reshape(-1).float()
    state2 = quant_state.state2
    q = quant_state.absmax.reshape(-1).long()
    scale2 = state2.absmax.reshape(-1).float().repeat_interleave(plan.blocksize2)[: q.numel()]
    absmax = state2.code.float()[q] * scale2  # rounded to fp32 here ...
    return absmax + plan.offset  # ... and again after the offset (no fused multiply-add)


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, NF4, ABSMAX2, CODE2, OFFSET, OUT, n_elements,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # output elements, int64
    mask = offs < n_elements
    byte = tl.load(PACKED + (offs >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(NF4 + nibble)  # the 16-entry fp32 table, always in bounds
    block = offs // BLOCKSIZE
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.load(CODE2 + q).to(tl.float32) * scale2
        absmax = absmax + tl.load(OFFSET)  # separate rounding: launched with enable_fp_fusion=False
    else:
        absmax = tl.load(ABSMAX + block, mask=mask, other=0.0).to(tl.float32)
    y = value * absmax
    if OUT.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the bits (the interpreter's fp32 -> bf16 cast truncates).
        bits = y.to(tl.uint32, bitcast=True)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, bits | 0x400000, rounded)  # keep NaN a (quiet) NaN
        result = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = y.to(OUT.dtype.element_ty)
    tl.store(OUT + offs, result, mask=mask)


def _launch_block() -> tuple[int, int]:
    """(elements per program, num_warps) for the compiled kernel, or for the interpreter."""
    if interpreter_enabled():
        return 16384, 4  # the interpreter runs programs one after another: fewer, larger ones
    return 1024, 4


def dequantize_nf4(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantise a bitsandbytes NF4 weight (``Params4bit.data`` + ``quant_state``).

    Returns a tensor of ``quant_state.shape`` and dtype ``dtype or quant_state.dtype``, equal
    bit for bit to the NF4 definition (and so to ``bitsandbytes.functional.dequantize_4bit``
    wherever that is right). ``packed`` may use any quant_storage dtype. ``out`` (contiguous, of
    that shape, dtype and device) receives the result instead of a new tensor.
    """
    plan = _validate(packed, quant_state, out, dtype)
    tensors = [packed, quant_state.absmax] + ([quant_state.state2.absmax] if plan.nested else [])
    if select_backend(*tensors) is Backend.TORCH or plan.n == 0:
        return dequantize_nf4_reference(packed, quant_state, out=out, dtype=dtype)
    device = packed.device
    result = out if out is not None else torch.empty(plan.shape, dtype=plan.dtype, device=device)
    flat = plan.bytes
    absmax = quant_state.absmax.reshape(-1).contiguous()
    if plan.nested:
        state2 = quant_state.state2
        absmax2 = state2.absmax.reshape(-1).contiguous()
        code2 = state2.code.reshape(-1).to(torch.float32).contiguous()
        offset = plan.offset.reshape(1)
    else:  # unused by the kernel (NESTED is a constexpr): any valid pointer
        absmax2 = code2 = offset = absmax
    block, num_warps = _launch_block()
    _dequantize_nf4_kernel[(triton.cdiv(plan.n, block),)](
        flat, absmax, nf4_code(device), absmax2, code2, offset, result, plan.n,
        BLOCKSIZE=plan.blocksize, BLOCKSIZE2=plan.blocksize2, NESTED=plan.nested, BLOCK=block,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return result


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


class _Plan:
    __slots__ = ("bytes", "shape", "n", "dtype", "blocksize", "nested", "blocksize2", "offset")


def _finish(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat contiguous uint8 tensor (a view when they already are)."""
    flat = packed.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _validate(packed, quant_state, out, dtype) -> _Plan:
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}.")
    if packed.dtype in (torch.bool, torch.complex64, torch.complex128) or packed.is_quantized:
        raise ValueError(
            f"packed must be the packed 4-bit bytes (uint8, or the float/int quant_storage bitsandbytes "
            f"stored them in), got a {packed.dtype} tensor."
        )
    for attr in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
        if not hasattr(quant_state, attr):
            raise ValueError(
                f"quant_state must be a bitsandbytes QuantState (no attribute {attr!r}), "
                f"got {type(quant_state).__name__}."
            )
    if quant_state.quant_type != "nf4":
        raise ValueError(
            f"quant_state.quant_type is {quant_state.quant_type!r}: only NF4 ('nf4') is supported."
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "quant_state.packing_format_for_cpu is set: bitsandbytes has repacked this weight for its CPU "
            "kernels (a different nibble layout, transposed bf16 absmax); undo it with "
            "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse before dequantising."
        )
    plan = _Plan()
    if quant_state.shape is None:
        raise ValueError("quant_state.shape is None: the dequantised shape is unknown.")
    plan.shape = torch.Size(quant_state.shape)
    plan.n = math.prod(plan.shape)
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {BLOCKSIZES}, got {quant_state.blocksize!r}.")
    plan.blocksize = int(quant_state.blocksize)
    plan.dtype = dtype if dtype is not None else quant_state.dtype
    if plan.dtype not in FLOAT_DTYPES:
        name = "dtype" if dtype is not None else "quant_state.dtype"
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {plan.dtype}.")

    plan.bytes = _as_bytes(packed)
    needed, itemsize = (plan.n + 1) // 2, packed.element_size()
    # Another quant_storage may pad the bytes up to a whole storage element, never more.
    if not needed <= plan.bytes.numel() < needed + itemsize:
        raise ValueError(
            f"packed must hold ceil(n / 2) = {needed} bytes for quant_state.shape {tuple(plan.shape)}, got "
            f"{plan.bytes.numel()} ({packed.dtype} tensor of shape {tuple(packed.shape)})."
        )
    n_blocks = -(-plan.n // plan.blocksize)
    absmax = quant_state.absmax
    if not isinstance(absmax, torch.Tensor):
        raise ValueError(f"quant_state.absmax must be a torch.Tensor, got {type(absmax).__name__}.")
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"quant_state.absmax must hold one value per block of {plan.blocksize} elements "
            f"({n_blocks}), got {absmax.numel()}."
        )
    plan.nested = bool(getattr(quant_state, "nested", False))
    plan.blocksize2, plan.offset = 1, None
    devices = {"packed": packed, "quant_state.absmax": absmax}
    if plan.nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise ValueError(f"quant_state.absmax of a nested state must have dtype torch.uint8, got {absmax.dtype}.")
        for attr in ("absmax", "code", "blocksize"):
            if not hasattr(state2, attr):
                raise ValueError(f"quant_state.state2 must be a QuantState (no attribute {attr!r}).")
        check_float_tensor("quant_state.state2.absmax", state2.absmax)
        check_float_tensor("quant_state.state2.code", state2.code)
        if getattr(state2, "dtype", None) not in (None, torch.float32):
            raise ValueError(f"quant_state.state2.dtype must be torch.float32, got {state2.dtype}.")
        if state2.code.numel() != 256:
            raise ValueError(f"quant_state.state2.code must hold 256 values, got {state2.code.numel()}.")
        if not isinstance(state2.blocksize, int) or state2.blocksize <= 0:
            raise ValueError(f"quant_state.state2.blocksize must be a positive int, got {state2.blocksize!r}.")
        plan.blocksize2 = state2.blocksize
        n_blocks2 = -(-n_blocks // plan.blocksize2)
        if state2.absmax.numel() != n_blocks2:
            raise ValueError(
                f"quant_state.state2.absmax must hold one value per block of {plan.blocksize2} absmax codes "
                f"({n_blocks2}), got {state2.absmax.numel()}."
            )
        offset = quant_state.offset
        if offset is None:
            raise ValueError("quant_state.offset must be set for a nested (double-quantised) state, got None.")
        if isinstance(offset, torch.Tensor):
            if offset.numel() != 1:
                raise ValueError(f"quant_state.offset must be a single value, got {offset.numel()} values.")
            devices["quant_state.offset"] = offset
            plan.offset = offset.reshape(()).to(torch.float32)
        else:
            plan.offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        devices["quant_state.state2.absmax"] = state2.absmax
        devices["quant_state.state2.code"] = state2.code
    else:
        check_float_tensor("quant_state.absmax", absmax)

    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}.")
        if out.shape != plan.shape:
            raise ValueError(f"out must have shape {tuple(plan.shape)} (quant_state.shape), got {tuple(out.shape)}.")
        if out.dtype != plan.dtype:
            raise ValueError(f"out must have dtype {plan.dtype} (the output dtype), got {out.dtype}.")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous.")
        devices["out"] = out
    check_same_device(**devices)
    return plan
