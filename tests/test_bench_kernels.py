"""The kernel benchmark script runs (tiny sizes here; the real sweep is run by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_cpu_case_measures_fused_below_unfused(bench):
    common = {"op": "fused_linear_cross_entropy", "tokens": 512, "hidden": 32, "vocab": 8192, "train_lm_head": True}
    unfused = bench.cpu_case({**common, "variant": "unfused"})
    fused = bench.cpu_case({**common, "variant": "fused"})
    assert abs(fused["loss"] - unfused["loss"]) < 1e-4
    report = {"device": "CPU (test)", "results": [unfused, fused]}
    table = bench.markdown(report)
    assert "| 512 x 32 -> 8192 | True |" in table


@pytest.mark.gpu
@pytest.mark.slow
def test_one_gpu_case_of_each_op_runs(bench):
    seen = set()
    for case in bench.gpu_cases(quick=True):
        if case.op in seen:
            continue
        seen.add(case.op)
        rows = bench.measure_gpu(case, "unsloth_like", case.variants["unsloth_like"], compiled=False)
        assert rows and all("ms" in row for row in rows), rows
    torch.cuda.empty_cache()


def test_gpu_run_measures_every_eager_variant_before_torch_compile(bench, monkeypatch):
    """A GPU run cut short by its time limit must already hold every op against eager (and Liger):
    torch.compile baselines, the slow part, come last, and the report is handed over after each."""
    cases = [bench.Case(op, "1x1", dict, {"unsloth_like": None, "torch_eager": None}, 8, 16) for op in ("a", "b")]
    measured = []

    def fake_measure(case, name, fn, compiled):
        measured.append((case.op, name))
        return [{"op": case.op, "size": case.size, "variant": name, "pass": "fwd", "ms": 1.0, "peak_mib": 0.0,
                 "gbps": 1.0}]

    monkeypatch.setattr(bench, "gpu_cases", lambda quick: cases)
    monkeypatch.setattr(bench, "measure_gpu", fake_measure)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    reports = []
    final = bench.run_gpu(quick=True, on_case=lambda report: reports.append(dict(report)))
    assert measured == [("a", "unsloth_like"), ("a", "torch_eager"), ("b", "unsloth_like"), ("b", "torch_eager"),
                        ("a", "torch_compile"), ("b", "torch_compile")]
    assert [r["complete"] for r in reports] == [False, False, False, True] and final["complete"]
    table = bench.markdown(final).splitlines()[2:]
    assert [line.split(" | ")[0] for line in table] == ["| a"] * 3 + ["| b"] * 3  # grouped per case
