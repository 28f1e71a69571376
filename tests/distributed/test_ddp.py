"""DDP on 2 CPU processes through TRL's SFTTrainer (``torchrun``, gloo, ``use_cpu=True``): the same
loss curve and LoRA weights as one process with the same global batch (2 rows per rank, or 1 row
per rank and 2 accumulation steps: the loss normalised by the tokens of all ranks and steps),
offloaded checkpointing on, a merged save written once; and the launch that would train
unsynchronised is refused.

Tolerances: the runs see the same rows per step, so the logged losses (means over the global
batch's tokens) agree to float32 rounding (1e-6 relative); the LoRA weights after 3 SGD steps
(lr 0.2) differ by the rounding of gradients summed in another order (half-batches, then an
all-reduce): measured 1.1e-8 (|w| < 0.08), bounded by 1e-7. (SGD, because Adam's first steps are
lr * g / |g| per element and turn rounding of near-zero gradients into up to a whole step:
measured 2.7e-6 with AdamW at lr 1e-3.)
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from unsloth_like.testing.zoo import zoo_model_dir

from .launch import run

pytestmark = pytest.mark.slow


def _train(zoo_cache, out, nproc, per_device, accumulation=1):
    run("sft_ddp.py", "--model", zoo_model_dir("llama", zoo_cache), "--out", out, "--per-device", per_device,
        "--accumulation", accumulation, nproc=nproc)
    return json.loads((out / "losses.json").read_text()), torch.load(out / "adapter.pt")


@pytest.mark.parametrize(("per_device", "accumulation"), [(2, 1), (1, 2)], ids=["batch", "accumulation"])
def test_two_processes_train_like_one_with_the_same_global_batch(per_device, accumulation, zoo_cache, tmp_path):
    one, adapter_one = _train(zoo_cache, tmp_path / "one", None, 4)
    two, adapter_two = _train(zoo_cache, tmp_path / "two", 2, per_device, accumulation)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == 3 and one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
    assert adapter_one.keys() == adapter_two.keys() and adapter_one
    for name, weight in adapter_one.items():
        assert (adapter_two[name] - weight).abs().max() <= 1e-7, name
    merged_one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged").state_dict()
    merged_two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
    assert max((merged_one[k] - merged_two[k]).abs().max().item() for k in merged_one) <= 1e-7
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith(".")]


def test_a_launch_without_use_cpu_never_trains_unsynchronised(zoo_cache, tmp_path):
    """transformers 5.24 / accelerate 1.15 set up one process per rank without ``use_cpu=True`` on a
    machine without a GPU (each would train alone): refused, with the fix. Older releases (the
    floor's) join the processes by themselves: then the run must really be distributed."""
    try:
        run("sft_ddp.py", "--model", zoo_model_dir("llama", zoo_cache), "--out", tmp_path, "--per-device", 2,
            "--no-use-cpu", nproc=2)
    except AssertionError as refusal:
        assert re.search(r"started as 2 processes .* pass use_cpu=True", str(refusal)), refusal
        assert not (tmp_path / "losses.json").exists()
    else:
        assert json.loads((tmp_path / "losses.json").read_text())["processes"] == 2
