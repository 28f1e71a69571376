"""Plain bitsandbytes baselines that compute the right maths on every host (tests and benchmarks).

Tests and benchmarks compare our QLoRA with plain HF + PEFT + bitsandbytes. On hosts where
bitsandbytes' native CPU ``dequantize_4bit`` is wrong (``unsloth_like.host``), that baseline would
be wrong, so for the process that runs them its CPU kernel is replaced by bitsandbytes' own
pure-torch implementation (the one it uses for odd rows and on devices without a native library).
This is a process-wide change to bitsandbytes' op registry and therefore lives here, in the test
and benchmark harness, never in the library: ``unsloth_like`` itself fixes its users' models per
instance (``models.nf4_cpu_guard``).

Every replacement is a ``torch.library`` registration that is removed again on exit, so the
kernel registered before it (bitsandbytes' native one, or an outer replacement) comes back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..host import DequantizeProbe, bitsandbytes_cpu_probe


@contextlib.contextmanager
def cpu_dequantize_4bit_kernel(kernel: Callable) -> Iterator[None]:
    """Register ``kernel(A, absmax, blocksize, quant_type, shape, dtype) -> Tensor`` as the CPU
    kernel of ``bitsandbytes::dequantize_4bit`` inside the block (torch warns once that a kernel
    is overridden)."""
    import bitsandbytes  # noqa: F401  (defines the op and registers its own kernels first)

    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("dequantize_4bit", kernel, "CPU", allow_override=True)  # over bitsandbytes' own
    try:
        yield
    finally:
        library._destroy()  # deregisters: the previous CPU kernel is the op's again


def bitsandbytes_torch_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    """bitsandbytes' own pure-torch ``dequantize_4bit`` (eager: its ``torch.compile`` wrapper would
    spend seconds compiling the same maths)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    return compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)


class BaselineRouting:
    """Whether this process routes bitsandbytes' CPU dequantisation through pure torch, and why."""

    def __init__(self, probe: DequantizeProbe):
        self.probe = probe
        self._stack = contextlib.ExitStack()
        if probe.wrong:
            self._stack.enter_context(cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit))

    @property
    def routed(self) -> bool:
        return self.probe.wrong

    def close(self) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def native(self) -> Iterator[None]:
        """bitsandbytes' registered CPU kernel again, inside the block (to show its bug)."""
        self._stack.close()
        try:
            yield
        finally:
            if self.routed:
                self._stack.enter_context(cpu_dequantize_4bit_kernel(bitsandbytes_torch_dequantize_4bit))

    def describe(self) -> str:
        if self.routed:
            return ("bitsandbytes' CPU dequantize_4bit is wrong on this host: plain-bitsandbytes baselines use "
                    "bitsandbytes' own pure-torch implementation in this process")
        return f"bitsandbytes' CPU dequantize_4bit: {self.probe.describe()}; baselines use it as is"


def correct_bitsandbytes_baselines() -> BaselineRouting:
    """Probe this host's bitsandbytes (before anything is rerouted: the probe's answer is cached
    for the library too) and, where it is wrong, route its CPU dequantisation through pure torch
    until ``close()``."""
    return BaselineRouting(bitsandbytes_cpu_probe())
