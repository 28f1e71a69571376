"""Backend selection: which implementation an op runs, and that the interpreter harness works."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from unsloth_like.kernels import _backend
from unsloth_like.kernels._backend import Backend, select_backend, use_backend

from .conftest import HAS_CUDA


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only switched on for CPU-only runs")
def test_cpu_test_runs_use_the_triton_interpreter():
    assert _backend.interpreter_enabled()
    assert select_backend(torch.ones(3)) is Backend.TRITON_INTERPRETER


def _backend_in_fresh_process(env_value: str | None) -> str:
    code = (
        "import torch\n"
        "from unsloth_like.kernels._backend import select_backend\n"
        "print(select_backend(torch.ones(2)).value)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    if env_value is not None:
        env["TRITON_INTERPRET"] = env_value
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_cpu_tensors_use_torch_reference_outside_tests():
    assert _backend_in_fresh_process(None) == "torch"
    assert _backend_in_fresh_process("0") == "torch"


def test_interpreter_switch_is_read_like_triton_reads_it():
    assert _backend_in_fresh_process("true") == "triton-interpreter"


def test_mixed_devices_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="different devices"):
        select_backend(torch.ones(1), torch.empty(1, device="meta"))


def test_no_tensor_is_an_error():
    with pytest.raises(ValueError, match="at least one tensor"):
        select_backend()


def test_use_backend_is_scoped_and_validated():
    default = select_backend(torch.ones(1))
    with use_backend("torch") as chosen:
        assert chosen is Backend.TORCH
        assert select_backend(torch.ones(1)) is Backend.TORCH
    assert select_backend(torch.ones(1)) is default
    with pytest.raises(ValueError, match="choose one of: triton, triton-interpreter, torch"):
        with use_backend("cuda-magic"):
            pass


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_forcing_compiled_triton_in_interpreter_mode_is_refused():
    with pytest.raises(RuntimeError, match="built for the interpreter"):
        with use_backend(Backend.TRITON):
            pass


def test_op_registry_reports_backend_per_device(monkeypatch):
    monkeypatch.setattr(_backend, "_REGISTRY", {})
    _backend.register_op("demo_op", "adds things")
    _backend.register_op("torch_only_op", "no Triton version", has_triton=False)
    _backend.register_op("demo_op", "adds things")  # same description again: fine
    with pytest.raises(RuntimeError, match="registered twice"):
        _backend.register_op("demo_op", "something else")
    cpu = _backend.op_backends("cpu")
    assert cpu["torch_only_op"] is Backend.TORCH
    assert cpu["demo_op"] is _backend.backend_for_device("cpu")
    assert [op.name for op in _backend.registered_ops()] == ["demo_op", "torch_only_op"]


# --- the harness itself: a real Triton kernel, run by the interpreter on CPU or compiled on GPU ---

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    # Upcast to fp32 for the arithmetic, as every kernel of ours does with 16-bit inputs.
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x + alpha * y).to(out_ptr.dtype.element_ty), mask=mask)


@pytest.mark.parametrize("n", [1, 127, 1000, 4099])
def test_triton_kernel_matches_torch_fp32(n):
    device = "cuda" if HAS_CUDA else "cpu"
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    out = torch.empty_like(x)
    _scaled_add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, 0.5, BLOCK=256)
    torch.testing.assert_close(out, x + 0.5 * y, rtol=0, atol=1e-6)


def test_triton_kernel_bf16_within_one_ulp():
    # The interpreter converts fp32 -> bf16 by truncation, compiled Triton rounds to nearest:
    # either way the result is within one bf16 ulp of torch's correctly rounded result.
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(1000, device=device, dtype=torch.bfloat16)
    y = torch.randn(1000, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    _scaled_add_kernel[(triton.cdiv(1000, 256),)](x, y, out, 1000, 0.5, BLOCK=256)
    exact = x.float() + 0.5 * y.float()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)
    assert ((out.float() - exact).abs() <= ulp).all()


@pytest.mark.gpu
def test_compiled_triton_is_chosen_for_cuda_tensors():
    expected = Backend.TRITON_INTERPRETER if _backend.interpreter_enabled() else Backend.TRITON
    assert select_backend(torch.ones(1, device="cuda")) is expected
