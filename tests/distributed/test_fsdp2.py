"""FSDP2 (``fully_shard``) on 2 CPU processes: the same training as one process, and saves that
run once and equal the single-process ones (see fsdp2_train.py for the run itself).

QLoRA as FSDP needs it: NF4 packed into float32 storage (``bnb_4bit_quant_storage``), so the
4-bit weights shard like the others; FSDP2 unshards them into plain parameters, and the fused
path takes their quantisation state from the layer (where bitsandbytes keeps a copy).

Tolerances: the sharded run sums each gradient in another order (two half-batches, then an
average over ranks), float32, and 3 SGD steps (lr 0.2) turn that into weight differences of the
float32 rounding of the updates: measured 7.5e-9 for LoRA and QLoRA adapters (|w| < 0.08), bounded
by 1e-7; full finetuning moves every weight, bounded by 1e-6. (SGD, because Adam's first steps
are lr * g / |g| per element, which turns the rounding of a near-zero gradient into up to a whole
step: measured 1e-5 with AdamW at lr 1e-3.)
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from unsloth_like.testing.zoo import zoo_model_dir

from .launch import run

pytestmark = pytest.mark.slow


def _train(mode, zoo_cache, out, nproc, units="layers", model="llama", precision="fp32"):
    run("fsdp2_train.py", "--model", zoo_model_dir(model, zoo_cache), "--mode", mode, "--out", out,
        "--units", units, "--precision", precision, nproc=nproc)
    return json.loads((out / "losses.json").read_text()), torch.load(out / "trainable.pt")


def _fusion(out) -> dict:
    return json.loads((out / "fusion.json").read_text())


@pytest.mark.parametrize(("mode", "weight_bound"), [("lora", 1e-7), ("qlora", 1e-7), ("full", 1e-6)])
def test_sharded_training_equals_one_process(mode, weight_bound, zoo_cache, tmp_path):
    _assert_sharded_run_equals_one_process(mode, weight_bound, zoo_cache, tmp_path, units="layers", model="llama")
    fusion = _fusion(tmp_path / "two")
    # Inside a decoder layer's unit the parameters are whole: the fused LoRA path runs. The loss is
    # fused too, with the head in the [final norm, lm_head] unit.
    assert fusion.pop("lm_head") == "fused"
    if mode != "full":
        assert set(fusion.values()) == {"fused"}


@pytest.mark.parametrize(("model", "mode", "weight_bound"), [("llama", "qlora", 1e-7), ("phi3", "full", 1e-6)])
def test_accelerate_fsdp2_units_equal_one_process(model, mode, weight_bound, zoo_cache, tmp_path):
    """The units accelerate's FSDP2 plugin makes (``fsdp2_prepare_model`` itself): a unit per
    decoder layer, the untied input embedding a unit of its own, the tail unit (with tied
    embeddings, Phi's case, the embedding joins it) and the root. Every fused path runs,
    the fused loss included, and training equals one process."""
    _assert_sharded_run_equals_one_process(mode, weight_bound, zoo_cache, tmp_path, units="accelerate", model=model)
    fusion = _fusion(tmp_path / "two")
    assert fusion.pop("lm_head") == "fused"
    if mode != "full":
        assert set(fusion.values()) == {"fused"}


def test_accelerate_bf16_mixed_precision_on_one_and_two_processes(zoo_cache, tmp_path):
    """accelerate's FSDP2 with ``mixed_precision: bf16`` (our fsdp2.yaml) on a bf16 model: the LoRA
    weights upcast to float32 masters, every unit computing and reducing in bf16. Every fused path
    runs on the bf16 parameters, and 2 processes train like 1 (both sharded, the same policy).

    Tolerances are bf16's (8 significant bits): the losses are bf16 values (the policy's output
    dtype), one unit in the last place apart at most (0.0625 at 10; measured 0.0625); gradients are
    averaged in bf16 over another split of the batch, which moves each of the 3 SGD updates by
    about 2^-8 of itself: measured 1.5e-4 on adapters of up to 0.08, bounded by 1e-3."""
    losses_one, weights_one = _train("lora", zoo_cache, tmp_path / "one", 1, units="accelerate", precision="bf16")
    losses_two, weights_two = _train("lora", zoo_cache, tmp_path / "two", 2, units="accelerate", precision="bf16")
    assert losses_one[-1] < losses_one[0]
    np.testing.assert_allclose(losses_two, losses_one, rtol=0, atol=0.0625)
    assert weights_one.keys() == weights_two.keys() and weights_one
    for name, weight in weights_one.items():
        assert weight.dtype == torch.float32  # accelerate's float32 masters of the trainable weights
        assert (weights_two[name] - weight).abs().max() <= 1e-3, name
    assert set(_fusion(tmp_path / "two").values()) == {"fused"}
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged").state_dict()
    two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
    assert one.keys() == two.keys()  # (a group of one gathers its shards for the save too)
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) <= 1e-3  # measured 4.8e-5


def _assert_sharded_run_equals_one_process(mode, weight_bound, zoo_cache, tmp_path, units, model):
    losses_one, weights_one = _train(mode, zoo_cache, tmp_path / "one", None, model=model)
    losses_two, weights_two = _train(mode, zoo_cache, tmp_path / "two", 2, units=units, model=model)
    assert losses_one[-1] < losses_one[0]  # it trained
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    assert weights_two.keys() == weights_one.keys() and weights_one
    for name, weight in weights_one.items():
        assert weights_two[name].shape == weight.shape  # gathered full tensors, not shards
        assert (weights_two[name] - weight).abs().max() <= weight_bound, name
    if mode != "full":
        one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged").state_dict()
        two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
        assert one.keys() == two.keys()
        assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    else:
        [path_one] = (tmp_path / "one" / "gguf").glob("*.gguf")
        [path_two] = (tmp_path / "two" / "gguf").glob("*.gguf")
        one = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path_one).tensors}
        two = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path_two).tensors}
        assert one.keys() == two.keys()
        assert max(np.abs(one[k] - two[k]).max() for k in one) <= weight_bound
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith(".")]  # one writer, no leftovers


def test_adapters_sharded_as_units_of_their_own_take_peft_modules(zoo_cache, tmp_path):
    """LoRA adapters and the lm_head as FSDP units of their own hold shards when our fused paths
    would read them: the fused LoRA groups step aside (PEFT's modules run, and unshard them), the
    fused loss runs as a forward of the head's unit (which gathers the head), and training still
    equals one process."""
    losses_one, weights_one = _train("lora", zoo_cache, tmp_path / "one", None)
    losses_two, weights_two = _train("lora", zoo_cache, tmp_path / "two", 2, units="modules")
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    for name, weight in weights_one.items():
        assert (weights_two[name] - weight).abs().max() <= 1e-7, name
    fusion = _fusion(tmp_path / "two")
    # The head's shard is gathered by running the fused loss as a forward of the head's unit.
    assert fusion.pop("lm_head") == "fused"
    assert set(fusion.values()) == {"parameters sharded by FSDP (a unit of their own): PEFT's modules run, which unshard them"}
