"""The one place that decides how a kernel op runs: compiled Triton, interpreted Triton, or torch.

Every op in ``unsloth_like.kernels`` ships a Triton implementation and a pure-torch reference
with the same signature. Which one runs is decided here, from the tensors' device:

* ``Backend.TRITON``: tensors on a CUDA (or ROCm) device and Triton importable -> compiled kernels.
* ``Backend.TRITON_INTERPRETER``: Triton's interpreter is on (``TRITON_INTERPRET=1``) -> the very
  same Triton kernels, executed in Python on CPU tensors. This is how the test suite proves the
  kernels on machines without a GPU.
* ``Backend.TORCH``: anything else (CPU tensors in normal use, or no Triton) -> torch reference.

``TRITON_INTERPRET`` is Triton's own switch, and Triton applies it when a kernel is *decorated*
(at import of the kernel module), so we read it once, when this module is imported, to stay
consistent with how the kernels were built. Set it before importing ``unsloth_like.kernels``
(``tests/conftest.py`` does).

``use_backend`` overrides the choice for a block of code (benchmarks run the torch reference on
the GPU as a baseline this way). It is a context variable, so it is scoped to the calling
thread/task and never leaks into other code.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = [
    "Backend",
    "backend_for_device",
    "KernelOp",
    "interpreter_enabled",
    "op_backends",
    "register_op",
    "registered_ops",
    "select_backend",
    "triton_available",
    "use_backend",
]

_TRUTHY = {"1", "true", "yes", "on"}  # the spellings Triton itself accepts for boolean knobs


class Backend(str, enum.Enum):
    TRITON = "triton"
    TRITON_INTERPRETER = "triton-interpreter"
    TORCH = "torch"

    def __str__(self) -> str:  # "triton", not "Backend.TRITON", in messages and reports
        return self.value


_INTERPRETER_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY
_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("unsloth_like_backend", default=None)


def interpreter_enabled() -> bool:
    """True when Triton kernels are built for the interpreter (``TRITON_INTERPRET`` at import)."""
    return _INTERPRETER_AT_IMPORT


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def select_backend(*tensors: torch.Tensor) -> Backend:
    """The backend an op must use for these input tensors."""
    device_types = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if not device_types:
        raise ValueError("select_backend needs at least one tensor to decide the device from.")
    if len(device_types) > 1:
        raise ValueError(
            f"Kernel inputs are on different devices ({', '.join(sorted(device_types))}); "
            "move them to one device before calling the op."
        )
    device_type = device_types.pop()
    forced = _forced.get()
    if forced is None:
        return backend_for_device(device_type)
    if forced is Backend.TRITON and device_type != "cuda":
        raise ValueError(f"Compiled Triton kernels need CUDA tensors, got {device_type} tensors.")
    return forced


def backend_for_device(device_type: str) -> Backend:
    """The backend chosen for tensors on a device of this type (``"cuda"``, ``"cpu"``, ...)."""
    if not triton_available():
        return Backend.TORCH
    if _INTERPRETER_AT_IMPORT:
        return Backend.TRITON_INTERPRETER
    if device_type == "cuda":  # ROCm tensors also report "cuda"; Triton supports both
        return Backend.TRITON
    return Backend.TORCH


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[Backend]:
    """Force ``backend`` for every op called inside the block (e.g. a torch baseline on GPU)."""
    try:
        chosen = Backend(backend)
    except ValueError:
        valid = ", ".join(b.value for b in Backend)
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of: {valid}.") from None
    if chosen is not Backend.TORCH and not triton_available():
        raise RuntimeError(f"Backend {chosen} needs Triton, which is not installed: pip install triton.")
    if chosen is Backend.TRITON and _INTERPRETER_AT_IMPORT:
        raise RuntimeError(
            "Triton kernels were built for the interpreter (TRITON_INTERPRET was set at import); "
            "start a process without TRITON_INTERPRET to run compiled kernels."
        )
    token = _forced.set(chosen)
    try:
        yield chosen
    finally:
        _forced.reset(token)


@dataclass(frozen=True)
class KernelOp:
    """A kernel op as the registry knows it: its public name and what it computes."""

    name: str
    summary: str
    has_triton: bool = True


_REGISTRY: dict[str, KernelOp] = {}


def register_op(name: str, summary: str, *, has_triton: bool = True) -> KernelOp:
    """Record an op so ``doctor`` can report it; each kernel module calls this once."""
    op = KernelOp(name, summary, has_triton)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != op:
        raise RuntimeError(f"Kernel op {name!r} is registered twice with different descriptions.")
    _REGISTRY[name] = op
    return op


def registered_ops() -> list[KernelOp]:
    return sorted(_REGISTRY.values(), key=lambda op: op.name)


def op_backends(device_type: str) -> dict[str, Backend]:
    """For each registered op, the backend it will use for tensors on ``device_type``."""
    chosen = backend_for_device(device_type)
    return {op.name: (chosen if op.has_triton else Backend.TORCH) for op in registered_ops()}
