"""The notebook path end to end (scripts/sft_e2e.py), shortened: the loss on the replies falls.
The committed 100-step curve is benchmarks/sft-e2e-cpu.json."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sft_e2e.py"


@pytest.mark.slow
def test_notebook_path_trains_and_the_loss_falls(zoo_cache, tmp_path):
    from unsloth_like.kernels import use_backend

    spec = importlib.util.spec_from_file_location("sft_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        with use_backend("torch"):
            result = module.run("qwen2", steps=24, cache_dir=zoo_cache, output_dir=str(tmp_path))
    finally:
        sys.modules.pop(spec.name, None)
    losses = result["losses"]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # step noise is ~0.05
