"""The RL benchmark script runs end to end on tiny settings (the real run is by hand)."""

from __future__ import annotations

import pytest

from .script_modules import forget_script, import_script


@pytest.fixture(scope="module")
def bench():
    yield import_script("bench_rl")
    forget_script("bench_rl")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["dpo", "grpo", "head"])
def test_both_variants_run_the_same_steps(trainer, bench, zoo_cache, tmp_path):
    if trainer == "head":
        pytest.importorskip("trl.kernels")  # TRL's chunked log-prob kernel (TRL >= 1.11)
    rows = [bench.run_variant({"device": "cpu", "trainer": trainer, "variant": variant, "vocab": 4099, "batch": 2,
                               "prompt_words": 6, "completion_words": 5, "generations": 2, "completion_tokens": 6,
                               "tokens": 50, "warmup": 1, "steps": 2, "backend": "torch",
                               "zoo_cache": str(zoo_cache), "output_dir": str(tmp_path / variant)})
            for variant in ("hf", "unsloth_like")]
    hf, ours = rows
    assert len(hf["losses"]) == len(ours["losses"]) == 3
    assert ours["losses"] == pytest.approx(hf["losses"], rel=1e-4, abs=1e-6)  # same batches, same samples
    assert hf["tokens_per_step"] == ours["tokens_per_step"] > 0
    assert all(row["s_per_step"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    report = bench._report("CPU", rows)
    assert set(report["ratios"][trainer]) == {"step_time_ratio", "tokens_per_s_ratio", "peak_memory_ratio",
                                               "first_loss_difference"}
