"""Shared plumbing for the kernel modules: Triton import, launch settings, input validation.

Validation lives here so every op rejects bad input the same way: a ``ValueError`` that names
the argument and what was expected, raised before any kernel is launched (never a Triton
compile error, never a silently wrong answer).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no Triton wheel on this platform: every op runs its torch reference
    HAS_TRITON = False

    class _Undecorated:
        """Stands in for ``triton``/``triton.language`` so kernel modules still import."""

        @staticmethod
        def constexpr(value=None):  # also used as an annotation: any object will do
            return value

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            return None

    triton = tl = _Undecorated()  # type: ignore[assignment]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"

# Largest row a single-block kernel handles; beyond it a row does not fit in registers/SRAM.
MAX_FUSED_BLOCK = 65536


def row_block_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one whole row of ``n_cols`` in one block."""
    block = triton.next_power_of_2(n_cols) if HAS_TRITON else n_cols
    if block > MAX_FUSED_BLOCK:
        raise ValueError(
            f"Rows of {n_cols} elements exceed the fused kernel limit of {MAX_FUSED_BLOCK}; "
            "use the torch reference for such sizes."
        )
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def backward_programs(device: torch.device, n_rows: int) -> int:
    """How many programs split the rows of a reduction-carrying backward kernel."""
    if device.type == "cuda":
        return max(1, min(n_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one after another


def check_float_tensor(name: str, tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dtype not in dtypes:
        allowed = _DTYPE_NAMES if dtypes == FLOAT_DTYPES else ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}, got {tensor.dtype}.")


def check_same_device(**tensors) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"All tensors must be on one device, got {listing}.")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple, meaning: str) -> None:
    """``expected`` may hold None for 'any size'; ``meaning`` explains the expected shape."""
    ok = tensor.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
    if not ok:
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {shown} ({meaning}), got {tuple(tensor.shape)}.")
