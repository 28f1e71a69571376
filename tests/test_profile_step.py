"""``python -m unsloth_like.bench.profile_step``: operators grouped by what they do, the table, and one
small end-to-end profile of both variants on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unsloth_like.bench import profile_step

VOCAB = 1234


@pytest.mark.parametrize("name, shapes, group", [
    ("aten::mm", [[256, 576], [576, VOCAB]], "lm_head matmuls"),
    ("aten::linear", [[256, 576], [VOCAB, 576], []], "lm_head matmuls"),
    ("aten::addmm", [[1536], [512, 576], [576, 1536]], "decoder matmuls"),
    ("aten::_log_softmax", [[1024, VOCAB], [], []], "loss"),
    ("aten::fill_", [[1024, VOCAB], []], "loss"),
    ("aten::embedding", [[VOCAB, 576], [2, 512], [], [], []], "other"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [[2, 9, 512, 64]], "attention"),
    ("Optimizer.step#AdamW.step", [], "optimizer"),
    ("aten::_foreach_mul_", [[]], "optimizer"),
    ("aten::silu", [[2, 512, 1536]], "other"),
])
def test_operators_fall_in_the_group_of_what_they_do(name, shapes, group):
    assert profile_step.group_of(name, shapes, VOCAB) == group


def _row(variant: str, seconds: float) -> dict:
    return {"variant": variant, "step_seconds": seconds * 0.9,
            "groups": {group: seconds / len(profile_step.GROUPS) for group in profile_step.GROUPS}}


def test_table_has_every_group_both_variants_and_their_difference():
    table = profile_step.markdown([_row("hf", 1.2), _row("unsloth_like", 0.6)])
    assert table.splitlines()[0] == "| where | HF + PEFT (s) | ours (s) | ours - HF (s) |"
    assert "| lm_head matmuls | 0.200 | 0.100 | -0.100 |" in table
    assert "| total (profiled) | 1.200 | 0.600 | -0.600 |" in table
    assert "| step without the profiler | 1.080 | 0.540 | |" in table


@pytest.mark.slow
def test_profile_of_both_variants_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs the torch paths, as users do
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "unsloth_like.bench.profile_step", "--size", "zoo", "--vocab", "3001",
                           "--seq", "32", "--batch", "2", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"hf", "unsloth_like"}
    for row in rows.values():
        assert row["vocab"] == 3001 and row["step_seconds"] > 0
        # Both variants' lm_head matmuls and loss are found by their vocabulary-sized inputs.
        assert row["groups"]["lm_head matmuls"] > 0 and row["groups"]["loss"] > 0
        assert row["groups"]["decoder matmuls"] > 0 and row["groups"]["attention"] > 0
    assert "| lm_head matmuls |" in done.stdout
