"""DDP on 2 CPU processes through TRL's SFTTrainer (``torchrun``, gloo, ``use_cpu=True``): the same
loss curve and LoRA weights as one process with the same global batch, offloaded checkpointing
on, a merged save written once; and the launch that would train unsynchronised is refused.

Tolerances: the two runs see the same rows per step, so the logged losses (means over the global
batch's tokens) agree to float32 rounding; the LoRA weights after 3 AdamW steps (lr 1e-3) differ by
the rounding of gradients summed in another order (two half-batches, then an all-reduce):
measured 4.9e-7, bounded by 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from unsloth_like.testing.zoo import zoo_model_dir

from .launch import run

pytestmark = pytest.mark.slow


def _train(zoo_cache, out, nproc, per_device):
    run("sft_ddp.py", "--model", zoo_model_dir("llama", zoo_cache), "--out", out, "--per-device", per_device,
        nproc=nproc)
    return json.loads((out / "losses.json").read_text()), torch.load(out / "adapter.pt")


def test_two_processes_train_like_one_with_the_same_global_batch(zoo_cache, tmp_path):
    one, adapter_one = _train(zoo_cache, tmp_path / "one", None, 4)
    two, adapter_two = _train(zoo_cache, tmp_path / "two", 2, 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == 3 and one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
    assert adapter_one.keys() == adapter_two.keys() and adapter_one
    for name, weight in adapter_one.items():
        assert (adapter_two[name] - weight).abs().max() <= 1e-6, name
    merged_one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged").state_dict()
    merged_two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
    assert max((merged_one[k] - merged_two[k]).abs().max().item() for k in merged_one) <= 1e-6
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith(".")]


def test_a_launch_without_use_cpu_is_refused_instead_of_training_unsynchronised(zoo_cache, tmp_path):
    with pytest.raises(AssertionError, match=r"started as 2 processes .* pass use_cpu=True"):
        run("sft_ddp.py", "--model", zoo_model_dir("llama", zoo_cache), "--out", tmp_path, "--per-device", 2,
            "--no-use-cpu", nproc=2)
    assert not (tmp_path / "losses.json").exists()
