"""``unsloth-like bench`` (unsloth_like.bench.report): settings, ratios, the Markdown table, the plot,
atomic files, and one quick end-to-end run on CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from unsloth_like.bench import report


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(list(argv))


def _row(variant: str, tokens_per_s: float, peak: float, losses: list[float]) -> dict:
    return {"variant": variant, "tokens_per_s": tokens_per_s, "s_per_step": 2048 / tokens_per_s, "peak_mib": peak,
            "losses": losses, "vocab": 32003}


def _report() -> dict:
    cells = []
    for mode, seq, batch in (("lora", 256, 8), ("qlora", 512, 4)):
        rows = [_row("hf", 1000.0, 900.0, [10.5, 10.4]), _row("unsloth_like", 1250.0, 300.0, [10.5000004, 10.4000002])]
        cells.append({"mode": mode, "seq": seq, "batch": batch, "rows": rows, **report.ratios(rows)})
    oom = {"variant": "hf", "out_of_memory": True}
    cells.append({"mode": "lora", "seq": 4096, "batch": 1, "rows": [oom, _row("unsloth_like", 900.0, 500.0, [9.0])],
                  **report.ratios([oom])})
    return {"benchmark": "train-report", "device": "CPU (2 cores)", "date": "2026-12-06", "model": "llama",
            "vocab": 32003, "tokens_per_step": 2048, "warmup": 2, "steps": 5, "repeats": 2, "seq": [256, 512, 4096],
            "versions": {"torch": "2.14.1", "transformers": "5.24.0"}, "cells": cells}


def test_settings_layer_defaults_quick_and_flags():
    assert report.settings(_args(), "cpu") == report.CPU_DEFAULTS
    assert report.settings(_args(), "cuda") == report.GPU_DEFAULTS
    assert report.settings(_args("--quick"), "cpu") == report.QUICK
    chosen = report.settings(_args("--quick", "--seq", "32", "96", "--steps", "4", "--repeats", "3"), "cpu")
    assert chosen == {**report.QUICK, "seq": [32, 96], "steps": 4, "repeats": 3}


def test_settings_refuse_rows_longer_than_a_step_in_one_sentence():
    with pytest.raises(ValueError, match=r"--seq 4096 is longer than --tokens-per-step 2048: .*raise --tokens-per"):
        report.settings(_args("--seq", "256", "4096"), "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        report.settings(_args("--steps", "0"), "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        report.settings(_args("--repeats", "0"), "cpu")
    with pytest.raises(ValueError, match="--size small is the CPU Llama's"):
        report.settings(_args("--size", "small"), "cuda")
    with pytest.raises(ValueError, match="--size small is the CPU Llama's"):
        report.settings(_args("--size", "small", "--model", "phi3"), "cpu")
    with pytest.raises(ValueError, match="--vocab 1 is too small"):
        report.settings(_args("--vocab", "32000", "1"), "cpu")
    with pytest.raises(ValueError, match="--name 'a/b' must be letters"):
        report.settings(_args("--name", "a/b"), "cpu")


def test_fastest_run_counts_and_every_run_is_kept():
    runs = [{**_row("hf", 1000.0, 900.0, [1.0]), "s_per_step": 2.0}, {**_row("hf", 1200.0, 900.0, [1.0]),
                                                                      "s_per_step": 1.5}]
    best = report.fastest(runs)
    assert best["s_per_step"] == 1.5 and best["s_per_step_of_each_run"] == [2.0, 1.5]
    oom = {"variant": "hf", "out_of_memory": True}
    assert report.fastest([runs[0], oom]) is oom


def test_ratios_are_ours_over_hf_and_need_both():
    rows = [_row("hf", 1000.0, 900.0, [10.5, 10.4]), _row("unsloth_like", 1250.0, 300.0, [10.5, 10.3])]
    got = report.ratios(rows)
    assert got["tokens_per_s_ratio"] == pytest.approx(1.25) and got["peak_memory_ratio"] == pytest.approx(1 / 3)
    assert got["step_time_ratio"] == pytest.approx(0.8)
    assert got["first_loss_difference"] == 0.0 and got["last_loss_difference"] == pytest.approx(0.1)
    assert report.ratios([{"variant": "hf", "out_of_memory": True}, rows[1]]) == {}


def test_markdown_table_has_every_row_ratio_and_the_plot():
    text = report.markdown(_report(), png_name="report-cpu.png")
    assert "### Training step: HF + PEFT vs ours (CPU (2 cores), 2026-12-06)" in text
    assert "torch 2.14.1, transformers 5.24.0" in text
    assert "| lora | 256 x 8 | HF + PEFT | 1000 | 2.048 | 900 |  |  |" in text
    assert "| lora | 256 x 8 | ours | 1250 | 1.638 | 300 | time 0.80x, memory 0.33x | 4.0e-07, 2.0e-07 |" in text
    assert "| lora | 4096 x 1 | HF + PEFT | out of memory |" in text
    assert "| lora | 4096 x 1 | ours | 900 | 2.276 | 500 |  |  |" in text  # no ratio without a baseline
    assert text.rstrip().endswith("![throughput and peak memory](report-cpu.png)")


def test_peers_get_ours_over_them_on_their_own_row():
    rows = [_row("hf", 1000.0, 900.0, [10.5, 10.4]), _row("unsloth_like", 1250.0, 300.0, [10.5, 10.3]),
            _row("unsloth", 1000.0, 400.0, [10.5, 10.35])]
    got = report.ratios(rows)
    assert got["tokens_per_s_ratio"] == pytest.approx(1.25)  # ours / HF, as before
    assert got["versus"]["unsloth"]["tokens_per_s_ratio"] == pytest.approx(1.25)
    assert got["versus"]["unsloth"]["peak_memory_ratio"] == pytest.approx(0.75)
    assert got["versus"]["unsloth"]["last_loss_difference"] == pytest.approx(0.05)
    cell = {"mode": "lora", "seq": 256, "batch": 8, "rows": rows, **got}
    text = report.markdown({**_report(), "cells": [cell]})
    assert text.startswith("### Training step: HF + PEFT, Unsloth vs ours (CPU (2 cores), 2026-12-06)")
    assert "| lora | 256 x 8 | ours | 1250 | 1.638 | 300 | time 0.80x, memory 0.33x |" in text
    assert "| lora | 256 x 8 | Unsloth | 1000 | 2.048 | 400 | ours / Unsloth: time 0.80x, memory 0.75x | 0.0e+00, 5.0e-02 |" in text
    assert "versus" not in report.ratios(rows[:2])


def test_peers_run_where_they_are_installed_on_the_devices_they_support(monkeypatch):
    installed = set()
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert report.variants("cpu") == report.variants("cuda") == ["hf", "unsloth_like"]
    installed.add("liger_kernel")  # GPU kernels only
    assert report.variants("cpu") == ["hf", "unsloth_like"]
    assert report.variants("cuda") == ["hf", "unsloth_like", "hf_liger"]
    installed.add("unsloth")  # a CPU backend too
    assert report.variants("cpu") == ["hf", "unsloth_like", "unsloth"]
    assert report.variants("cuda") == ["hf", "unsloth_like", "hf_liger", "unsloth"]


def test_several_vocabularies_get_a_column_of_their_own():
    several = _report()
    for cell, vocab in zip(several["cells"], (32000, 262144, 262144)):
        cell["vocab"] = vocab
    several.update(vocab=[32000, 262144], size="small")
    text = report.markdown(several)
    assert "model `llama` at SmolLM2-135M's width (4 layers) (vocabulary per row)" in text
    assert "| mode | vocab | seq x batch | variant |" in text
    assert "| lora | 32000 | 256 x 8 | ours | 1250 | 1.638 | 300 | time 0.80x, memory 0.33x |" in text
    assert "| lora | 262144 | 4096 x 1 | HF + PEFT | out of memory |" in text
    if report.importlib.util.find_spec("matplotlib") is not None:
        assert report.plot(several)[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_puts_json_markdown_and_png_in_place(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the plots extra")
    paths = report.write(_report(), tmp_path / "benchmarks", "cpu")
    assert [p.name for p in paths] == ["report-cpu.json", "report-cpu.md", "report-cpu.png"]
    assert json.loads(paths[0].read_text())["cells"][0]["tokens_per_s_ratio"] == pytest.approx(1.25)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "benchmarks").iterdir()) == [p.name for p in paths]  # no partials


def test_write_without_matplotlib_says_how_to_get_the_plot(tmp_path, monkeypatch, capsys):
    real = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    paths = report.write(_report(), tmp_path, "cpu")
    assert [p.name for p in paths] == ["report-cpu.json", "report-cpu.md"]
    assert "pip install 'unsloth-like[plots]'" in capsys.readouterr().out


def test_cli_refuses_bad_settings_before_measuring(tmp_path):
    done = subprocess.run([sys.executable, "-m", "unsloth_like", "bench", "--seq", "8192", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--seq 8192 is longer than --tokens-per-step" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_report_runs_end_to_end_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs the torch paths, as users do
    done = subprocess.run([sys.executable, "-m", "unsloth_like", "bench", "--quick", "--modes", "lora", "qlora",
                           "--vocab", "700", "1500", "--size", "small", "--name", "vocab", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "report-cpu-vocab.json").read_text())
    assert [(c["mode"], c["vocab"], c["seq"], c["batch"]) for c in result["cells"]] == [
        ("lora", 700, 64, 2), ("lora", 1500, 64, 2), ("qlora", 700, 64, 2), ("qlora", 1500, 64, 2)]
    assert result["vocab"] == [700, 1500] and result["size"] == "small"
    for cell in result["cells"]:
        assert [row["variant"] for row in cell["rows"]] == ["hf", "unsloth_like"]
        assert cell["first_loss_difference"] < 1e-4  # same weights, same batch: the same first loss
        assert cell["tokens_per_s_ratio"] > 0 and cell["peak_memory_ratio"] > 0
    table = (tmp_path / "report-cpu-vocab.md").read_text()
    assert table.count("| ours |") == 4 and "| mode | vocab |" in table


def test_readme_shows_the_committed_cpu_report():
    """The README's table is the committed report's, row for row (regenerate both together)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = [line for line in (root / "benchmarks" / "report-cpu.md").read_text().splitlines() if line.startswith("| ")]
    readme = (root / "README.md").read_text()
    assert rows and all(row in readme for row in rows)
    assert json.loads((root / "benchmarks" / "report-cpu.json").read_text())["benchmark"] == "train-report"
