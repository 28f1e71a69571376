"""Comparison helpers with tolerances derived from each dtype's precision.

A kernel and its reference compute the same maths in a different order (and the Triton
interpreter rounds fp32 -> bf16/fp16 by truncation where torch rounds to nearest), so results
may differ by a couple of units in the last place of the output dtype: 2**-7 relative for
bf16 (8 significant bits), 2**-10 for fp16 (11 bits). fp32 outputs differ only by summation
order and ``rsqrt``/``exp`` implementations: about 1e-6 relative.
"""

from __future__ import annotations

import torch

# (rtol, atol) for elementwise outputs: two ulps of the dtype, and an absolute floor of a few
# ulps at magnitude ~2**-4, where values of N(0, 1)-scaled activations stop dominating.
ELEMENTWISE = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2 * 2**-10, 2**-14),
    torch.bfloat16: (2 * 2**-7, 2**-10),
}
# Relative Frobenius-norm error for gradients that pass through reductions: the reference's own
# autograd rounds every intermediate to the dtype, so allow ~4 ulps of norm-wise error.
NORMWISE = {torch.float32: 2e-6, torch.float16: 4 * 2**-10, torch.bfloat16: 4 * 2**-7}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, ulps: float = 1.0):
    dtype = dtype or expected.dtype
    rtol, atol = ELEMENTWISE[dtype]
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=rtol * ulps, atol=atol * ulps)


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    error = (a - e).norm() / e.norm().clamp_min(1e-30)
    assert error <= NORMWISE[dtype] * factor, f"relative norm error {error:.3e} > {NORMWISE[dtype] * factor:.3e}"
