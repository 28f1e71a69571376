"""Resume: a run SIGKILLed after a checkpoint and resumed with resume_from_checkpoint=True ends
with the same adapter as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

JOB = Path(__file__).resolve().parent / "resume_job.py"


def _run(output_dir, zoo_cache, *flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the user's CPU path
    return subprocess.run([sys.executable, str(JOB), str(output_dir), str(zoo_cache), *flags],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_resume_after_kill_reaches_the_uninterrupted_parameters(zoo_cache, tmp_path):
    straight = _run(tmp_path / "straight", zoo_cache)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run(tmp_path / "resumed", zoo_cache, "--kill-after-step", "4")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"] and not (tmp_path / "resumed" / "final").exists()

    resumed = _run(tmp_path / "resumed", zoo_cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and expected
    initial_b = [k for k in expected if "lora_B" in k]
    assert all(expected[k].abs().sum() > 0 for k in initial_b)  # training moved the adapters
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-7)
