"""Facts about this host that change results: the CPU, and whether bitsandbytes dequantises right.

bitsandbytes' native CPU library picks an AVX512 code path for ``dequantize_4bit`` from the CPU
itself (cpuid), not from torch or any environment variable. On CPUs that have AVX512 that path
indexes the block absmax as if every row started a new block, so a 4-bit weight whose rows (last
dimension) are not a multiple of the blocksize is dequantised with the wrong scales (measured with
bitsandbytes 0.50.2: max error 1.65 where the quantisation error is 0.29). Nothing short of running
the op says whether a host is affected, so ``bitsandbytes_cpu_probe`` runs it once on a small
tensor with such rows and compares it with the definition of NF4 (code table x block absmax,
``kernels.quant.dequantize_nf4_reference``). The loaders use the answer to route affected 4-bit
layers through our own dequantisation (``models.nf4_cpu_guard``); the test harness uses it to say
which path its baselines took.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# (shape, blocksize) of the probe: rows of 64 and 96 elements are multiples of 16 (the AVX512
# path's vector) but not of the blocksize, which is what that path gets wrong.
_PROBE_CASES = (((7, 64), 128), ((5, 96), 64))


@dataclass(frozen=True)
class CpuFacts:
    model: str
    cores: int
    flags: frozenset
    torch_capability: str  # what torch dispatches its own CPU kernels to ("AVX512", "AVX2", ...)

    @property
    def avx512(self) -> bool:
        """The CPU has AVX512F (what bitsandbytes' native library tests with cpuid)."""
        return "avx512f" in self.flags


@functools.cache
def cpu_facts() -> CpuFacts:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:  # x86 / ARM spelling
                    flags = frozenset(value.split())
    except OSError:  # not Linux: the model from platform, flags unknown
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuFacts(model=model or platform.processor() or platform.machine() or "unknown", cores=cores,
                    flags=flags, torch_capability=torch.backends.cpu.get_cpu_capability())


@dataclass(frozen=True)
class DequantizeProbe:
    """What a probe of a 4-bit CPU dequantisation found.

    ``status``: ``"correct"``, ``"wrong"`` (results differ from the NF4 definition) or
    ``"unavailable"`` (bitsandbytes is not installed or the op could not run; ``detail`` says why).
    """

    status: str
    max_error: float | None = None
    detail: str = ""

    @property
    def wrong(self) -> bool:
        return self.status == "wrong"

    def describe(self) -> str:
        if self.status == "correct":
            return "correct (matches the NF4 definition on rows that are not a multiple of the blocksize)"
        if self.status == "wrong":
            return (f"WRONG on rows that are not a multiple of the blocksize (max error {self.max_error:.3g}; "
                    "bitsandbytes' AVX512 CPU path): unsloth_like dequantises affected 4-bit layers itself")
        return f"not probed ({self.detail})"


def probe_dequantize(dequantize) -> DequantizeProbe:
    """Compare ``dequantize(packed, quant_state) -> tensor`` with the NF4 definition on the probe's
    small CPU tensors. ``bitsandbytes_cpu_probe`` passes bitsandbytes' own function; tests pass
    stand-ins."""
    import bitsandbytes.functional as bnb_f

    from .kernels.quant import dequantize_nf4_reference

    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for shape, blocksize in _PROBE_CASES:
        weight = torch.randn(shape, generator=generator)
        packed, state = bnb_f.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                            compress_statistics=False, quant_storage=torch.uint8)
        expected = dequantize_nf4_reference(packed, state)
        actual = dequantize(packed, state)
        if actual.shape != expected.shape:
            return DequantizeProbe("wrong", float("inf"), f"shape {tuple(actual.shape)} for {tuple(expected.shape)}")
        error = (actual.float() - expected).abs().max().item()
        worst = max(worst, error if error == error else float("inf"))  # NaN counts as wrong
    # A correct implementation is bit-exact; 1e-6 of the scale leaves room for a future fused
    # multiply-add while the bug's errors are of the order of the weights themselves.
    return DequantizeProbe("correct" if worst <= 1e-6 else "wrong", worst)


@functools.cache
def bitsandbytes_cpu_probe() -> DequantizeProbe:
    """Whether ``bitsandbytes.functional.dequantize_4bit`` is right on this CPU (cached per process).

    Run it before anything reroutes bitsandbytes' CPU op (the test harness does so on affected
    hosts): the answer is about the op bitsandbytes registers, and stays cached.
    """
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as error:  # not installed, or its import fails: nothing of it runs here
        return DequantizeProbe("unavailable", detail=f"bitsandbytes does not import: {error}")
    try:
        return probe_dequantize(lambda packed, state: bnb_f.dequantize_4bit(packed, state, quant_type="nf4"))
    except Exception as error:  # an op that raises is reported, never raised from here
        return DequantizeProbe("unavailable", detail=f"bitsandbytes' CPU 4-bit op failed: {error}")
