"""scripts/bench_gguf.py runs end to end (tiny preset) and finds our files identical to llama.cpp's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gguf.py"


@pytest.mark.slow
def test_bench_gguf_reports_identical_files(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'unsloth-like[gguf-check]'")
    out = tmp_path / "gguf.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--methods", "q4_k_m", "q8_0",
                           "--workdir", str(tmp_path), "--out", str(out), "--repeats", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["method"] for row in result["results"]] == ["q4_k_m", "q8_0"]
    assert all(row["identical"] and row["python_identical"] and row["ours"]["seconds"] > 0
               for row in result["results"])
    assert {row["ours"]["quantisers"] for row in result["results"]} <= {"C (quants.c)", "torch/numpy"}
    assert {row["ours_python"]["quantisers"] for row in result["results"]} == {"torch/numpy"}
    for row in result["results"]:  # the fastest of 2 runs is reported, both are kept
        for kind in ("ours", "llama.cpp"):
            assert len(row[kind]["all_seconds"]) == 2 and row[kind]["seconds"] == min(row[kind]["all_seconds"])


@pytest.mark.slow
def test_bench_gguf_without_llama_cpp_measures_ours_only(tmp_path):
    """A GPU machine may lack llama-cpp-python: the export is still timed, and the report says so."""
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "gguf.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--methods", "q8_0",
                           "--workdir", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "measuring ours only" in done.stdout
    result = json.loads(out.read_text())
    assert result["compared_with_llamacpp"] is False
    [row] = result["results"]
    assert row["identical"] is None and row["llama.cpp"] is None and row["ours"]["seconds"] > 0
