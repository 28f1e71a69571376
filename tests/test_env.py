"""`env_report()` / `python -m unsloth_like doctor`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

import unsloth_like
from unsloth_like import env


def test_report_names_versions_device_and_backends():
    report = unsloth_like.env_report()
    assert f"unsloth_like {unsloth_like.__version__}" in report
    assert f"torch            {torch.__version__}" in report
    assert f"transformers     {transformers.__version__}" in report
    assert "bf16 training" in report
    assert "kernel backends:" in report
    if not torch.cuda.is_available():
        assert "accelerator      none" in report


def test_bf16_answer_follows_the_device():
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert unsloth_like.is_bfloat16_supported() is expected


def test_missing_packages_are_reported_with_the_install_line(monkeypatch):
    real = env.package_version
    monkeypatch.setattr(env, "package_version", lambda d: None if d in ("peft", "xformers") else real(d))
    info = env.collect_env()
    assert info.missing_required == ["peft"]
    text = env.format_env(info)
    assert "required package peft is not installed: pip install peft" in text
    assert "xformers         missing -> pip install 'unsloth-like[xformers]'" in text


def test_registered_ops_appear_with_their_backend(monkeypatch):
    from unsloth_like.kernels import _backend

    monkeypatch.setattr(_backend, "_REGISTRY", {})
    _backend.register_op("rms_norm", "RMSNorm")
    text = env.format_env(env.collect_env())
    assert f"cpu   rms_norm                         {_backend.backend_for_device('cpu')}" in text


def test_doctor_command_runs_in_a_fresh_process():
    done = subprocess.run(
        [sys.executable, "-m", "unsloth_like", "doctor"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "packages:" in done.stdout and "kernel backends:" in done.stdout


def test_cli_rejects_unknown_command():
    done = subprocess.run([sys.executable, "-m", "unsloth_like", "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_report_names_the_host_and_what_bitsandbytes_does_on_it():
    from unsloth_like.host import bitsandbytes_cpu_probe, cpu_facts

    report = unsloth_like.env_report()
    cpu = cpu_facts()
    assert f"cpu              {cpu.model}, {cpu.cores} cores" in report
    assert f"avx512           {'yes' if cpu.avx512 else 'no'} (torch CPU capability {cpu.torch_capability})" in report
    assert f"bnb 4-bit (CPU)  {bitsandbytes_cpu_probe().describe()}" in report
    assert bitsandbytes_cpu_probe().status in ("correct", "wrong")  # bitsandbytes is a dependency: it ran
    from unsloth_like.save.gguf import native

    assert f"gguf quantisers  {native.describe()}" in report


def test_test_environment_has_a_torchvision_that_runs_beside_torch():
    """The vision extra (make test installs it): a torchvision built for another torch imports but
    fails on its first compiled op; doctor says so."""
    if env.package_version("torchvision") is None:
        pytest.fail("torchvision is missing: install the vision extra (pip install -e '.[vision]'; make test does)")
    assert env._torchvision_problem() is None


def test_a_mismatched_torchvision_is_reported(monkeypatch):
    import torchvision

    def missing_operator(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", missing_operator)
    text = env.format_env(env.collect_env())
    assert f"torchvision {env.package_version('torchvision')} does not run beside torch {torch.__version__}" in text
    assert "operator torchvision::nms does not exist" in text
