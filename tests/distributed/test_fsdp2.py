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


def _train(mode, zoo_cache, out, nproc, units="layers"):
    run("fsdp2_train.py", "--model", zoo_model_dir("llama", zoo_cache), "--mode", mode, "--out", out,
        "--units", units, nproc=nproc)
    return json.loads((out / "losses.json").read_text()), torch.load(out / "trainable.pt")


@pytest.mark.parametrize(("mode", "weight_bound"), [("lora", 1e-7), ("qlora", 1e-7), ("full", 1e-6)])
def test_sharded_training_equals_one_process(mode, weight_bound, zoo_cache, tmp_path):
    losses_one, weights_one = _train(mode, zoo_cache, tmp_path / "one", None)
    losses_two, weights_two = _train(mode, zoo_cache, tmp_path / "two", 2)
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
    if mode != "full":  # inside a decoder layer's unit the parameters are whole: the fused LoRA path runs
        assert set(json.loads((tmp_path / "two" / "fusion.json").read_text()).values()) == {"fused"}


def test_adapters_sharded_as_units_of_their_own_take_peft_modules(zoo_cache, tmp_path):
    """LoRA adapters and the lm_head as FSDP units of their own hold shards when our fused paths
    would read them: those step aside (PEFT's modules and upstream's head run, and unshard them),
    and training still equals one process."""
    losses_one, weights_one = _train("lora", zoo_cache, tmp_path / "one", None)
    losses_two, weights_two = _train("lora", zoo_cache, tmp_path / "two", 2, units="modules")
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    for name, weight in weights_one.items():
        assert (weights_two[name] - weight).abs().max() <= 1e-7, name
    reasons = set(json.loads((tmp_path / "two" / "fusion.json").read_text()).values())
    assert reasons == {"parameters sharded by FSDP (a unit of their own): PEFT's modules run, which unshard them"}
