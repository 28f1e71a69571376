"""The training-step benchmark (unsloth_like.bench.train_step, scripts/bench_train.py) runs end to end
on tiny settings (the real run is by hand)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from unsloth_like.testing import zoo

from .script_modules import SCRIPTS

SCRIPT = SCRIPTS / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    from unsloth_like.bench import train_step

    return train_step


@pytest.mark.slow
@pytest.mark.parametrize(("model", "mode", "vocab"), [("llama", "lora", 32003), ("llama", "qlora", 32003),
                                                     ("llama", "full", 32003), ("phi3", "lora", 4099),
                                                     ("gemma3_text", "qlora", 1043)])
def test_both_variants_run_the_same_first_step(model, mode, vocab, bench, zoo_cache, monkeypatch):
    from unsloth_like.kernels import use_backend
    from unsloth_like.testing import zoo

    real = zoo.load_zoo_model
    monkeypatch.setattr(zoo, "load_zoo_model", lambda name, **kw: real(name, cache_dir=zoo_cache, **kw))
    rows = []
    with use_backend("torch"):  # the interpreter would take minutes; the plumbing is what is tested
        for variant in ("hf", "unsloth_like"):
            rows.append(bench.run_variant({"device": "cpu", "variant": variant, "mode": mode, "model": model,
                                           "vocab": vocab, "gradient_checkpointing": False, "batch": 2, "seq": 32,
                                           "warmup": 1, "steps": 2}))
    hf, ours = rows
    assert abs(hf["losses"][0] - ours["losses"][0]) < 1e-4
    assert all(row["tokens_per_s"] > 0 and row["vocab"] == vocab for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_both_variants_run_the_same_first_vlm_step(mode, bench, zoo_cache, monkeypatch):
    from unsloth_like.kernels import use_backend
    from unsloth_like.testing import zoo

    real = zoo.load_zoo_model
    monkeypatch.setattr(zoo, "load_zoo_model", lambda name, **kw: real(name, cache_dir=zoo_cache, **kw))
    rows = []
    with use_backend("torch"):
        for variant in ("hf", "unsloth_like"):
            rows.append(bench.run_variant({"device": "cpu", "variant": variant, "mode": mode, "model": "qwen2_vl",
                                           "gradient_checkpointing": False, "batch": 2, "seq": 32, "image_grid": 4,
                                           "warmup": 1, "steps": 2}))
    hf, ours = rows
    assert abs(hf["losses"][0] - ours["losses"][0]) < 1e-4
    assert all(row["tokens_per_s"] > 0 and row["vocab"] == 16387 for row in rows)


def test_vlm_batches_hold_one_image_per_row_and_no_stray_vision_tokens(bench, zoo_cache):
    import transformers

    config = transformers.AutoConfig.from_pretrained(zoo.zoo_model_dir("qwen2_vl", zoo_cache))
    batch = bench._batch(config, {"batch": 3, "seq": 40, "image_grid": 4, "device": "cpu"}, config.text_config.vocab_size)
    image = batch["input_ids"] == config.image_token_id
    assert image.sum(dim=1).tolist() == [4, 4, 4] and batch["pixel_values"].shape[0] == 3 * 16
    assert ((batch["input_ids"] == config.vision_start_token_id).sum(dim=1) == 1).all()
    assert (batch["labels"][image] == -100).all() and (batch["labels"][~image] >= 0).all()


def test_longest_sequence_doubles_until_out_of_memory(bench, monkeypatch):
    tried = []

    def fake(spec, checkpoints=None):
        tried.append(spec["seq"])
        return None if spec["seq"] > 8192 else {"tokens_per_s": 1.0}

    monkeypatch.setattr(bench, "run_subprocess", fake)
    assert bench.longest_sequence({"variant": "hf"}) == 8192
    assert tried == [2048, 4096, 8192, 16384]


def test_report_gives_ours_over_hf_only_when_both_ran(bench):
    row = {"tokens_per_s": 100.0, "s_per_step": 2.0, "peak_mib": 1000.0}
    both = bench._report("H200", "lora", [{**row, "variant": "hf"},
                                          {**row, "variant": "unsloth_like", "tokens_per_s": 250.0, "peak_mib": 300.0}],
                         complete=True)
    assert (both["tokens_per_s_ratio"], both["peak_memory_ratio"], both["complete"]) == (2.5, 0.3, True)
    peer_only = bench._report("H200", "lora", [{**row, "variant": "hf_liger"}], complete=True)
    assert "tokens_per_s_ratio" not in peer_only and peer_only["results"][0]["variant"] == "hf_liger"
    unsloth = bench._report("H200", "lora", [{**row, "variant": "unsloth_like", "tokens_per_s": 150.0},
                                             {**row, "variant": "unsloth", "peak_mib": 2000.0}], complete=True)
    assert unsloth["vs_unsloth"]["tokens_per_s_ratio"] == 1.5 and unsloth["vs_unsloth"]["peak_memory_ratio"] == 0.5
    assert "tokens_per_s_ratio" not in unsloth  # no HF row: no ours / HF


def test_liger_variant_is_refused_without_a_gpu_in_one_sentence(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", "hf_liger", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "needs a CUDA device and liger-kernel" in done.stderr
    assert not (tmp_path / "x.json").exists()


# The unsloth variant. The suite does not install Unsloth (its pins are below our tested newest
# releases), so these run it against a stand-in with Unsloth's call signatures that refuses to be
# imported after transformers (tests/peer_fakes/unsloth); make bench-unsloth runs the real one.
PEER_FAKES = Path(__file__).resolve().parent / "peer_fakes"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_unsloth_variant_loads_the_same_model_and_starts_from_the_same_adapters(mode, bench, monkeypatch):
    from unsloth_like.bench.unsloth_variant import PeerCheckpoints

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU runs the torch paths, as users do
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PEER_FAKES), os.environ.get("PYTHONPATH")])))
    spec = {"device": "cpu", "mode": mode, "model": "llama", "vocab": 1500, "gradient_checkpointing": False,
            "size": "zoo", "batch": 2, "seq": 32, "warmup": 1, "steps": 3}
    with PeerCheckpoints() as checkpoints:
        hf = bench.run_subprocess({**spec, "variant": "hf"}, checkpoints)
        peer = bench.run_subprocess({**spec, "variant": "unsloth"}, checkpoints)
        root = checkpoints.root
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-0"]
    assert not root.exists() and "checkpoint" not in peer and peer["variant"] == "unsloth"
    assert peer["vocab"] == hf["vocab"] == 1500
    # The stand-in seeds its adapters differently: only the copied ones make the steps after the
    # warm-up agree. fp32 on both sides; ours fuses the loss and the LoRA products, so the sums
    # round differently (~1e-6 relative on a loss of ~7.3), and Adam's steps carry that on.
    assert peer["losses"] == pytest.approx(hf["losses"], abs=1e-4)


def test_adapters_are_copied_only_when_they_are_the_same_ones():
    import torch

    from unsloth_like.bench.unsloth_variant import copy_adapters

    model = torch.nn.ModuleDict({"q_proj": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2, bias=False),
                                                                 "base": torch.nn.Linear(3, 3, bias=False)})})
    copy_adapters(model, {"q_proj.lora_A.weight": torch.ones(2, 3)})
    assert torch.equal(model["q_proj"]["lora_A"].weight, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"not the ones the other variants start from \(1 missing.*0 extra"):
        copy_adapters(model, {"q_proj.lora_A.weight": torch.ones(2, 3), "k_proj.lora_A.weight": torch.ones(2, 3)})
    with pytest.raises(RuntimeError, match=r"\(0 missing, e.g. \[\]; 1 extra, e.g. \['q_proj.lora_A.weight'\]\)"):
        copy_adapters(model, {})


def test_unsloth_variant_is_refused_where_unsloth_is_missing_in_one_sentence(tmp_path, bench, monkeypatch):
    import subprocess

    if bench.importlib.util.find_spec("unsloth") is None:  # as in CI
        done = subprocess.run([sys.executable, str(SCRIPT), "--variants", "unsloth", "--out", str(tmp_path / "x.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "--variants unsloth needs Unsloth installed next to unsloth_like" in done.stderr
        assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="pass a PeerCheckpoints"):
        bench.run_subprocess({"variant": "unsloth", "device": "cpu"})
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object() if name == "unsloth" else real(name))
    bench.refuse_unsloth("gemma3_text")  # installed, a text model: it runs
    with pytest.raises(SystemExit, match=r"covers the text models \(llama, phi3, gemma3_text\), not qwen2_vl"):
        bench.refuse_unsloth("qwen2_vl")


def test_unsloths_cpu_loss_is_switched_on_where_the_model_has_it():
    from types import SimpleNamespace

    from unsloth_like.bench.unsloth_variant import turn_on_cpu_training_loss

    inner = SimpleNamespace(_unsloth_cpu_chunked_ce=True)  # Unsloth's CPU model, inside PEFT's wrappers
    assert turn_on_cpu_training_loss(SimpleNamespace(base_model=SimpleNamespace(model=inner)))
    assert inner._unsloth_cpu_chunked_ce_active is True
    assert not turn_on_cpu_training_loss(SimpleNamespace(base_model=SimpleNamespace(model=SimpleNamespace())))


def test_a_vocabulary_below_the_special_ids_is_refused_before_saving():
    import transformers

    from unsloth_like.bench.unsloth_variant import refuse_unloadable

    config = transformers.LlamaConfig(vocab_size=700, pad_token_id=858, bos_token_id=854, eos_token_id=855)
    with pytest.raises(SystemExit, match=r"--vocab 700 is below the model's pad_token_id 858: .* use --vocab 859"):
        refuse_unloadable(config)
    refuse_unloadable(transformers.LlamaConfig(vocab_size=1500, pad_token_id=858))
