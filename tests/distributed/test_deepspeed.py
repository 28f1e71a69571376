"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes through TRL's SFTTrainer (``torchrun``, gloo,
``use_cpu=True``, ``SFTConfig(deepspeed=...)``): the same loss curve and LoRA weights as one
process with the same global batch, and a merged save, written once, equal to the one-process
save.

ZeRO-2 keeps parameters whole on every rank: every fused path runs. ZeRO-3 partitions them and
gathers each module's parameters in hooks around that module's forward: the fused LoRA groups
step aside (PEFT's modules run), the loss is TRL's fused head with its own ZeRO-3 gather, and the
save gathers the partitions to rank 0. (Without that gather rank 0 would write the empty local
tensors, as it did before.)

Tolerances as in test_ddp: float32, the same rows per step, gradients summed in another order:
losses to 1e-6 relative, LoRA weights after 3 SGD steps bounded by 1e-7 (measured 9.3e-9).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from unsloth_like.testing.zoo import zoo_model_dir

from .launch import run

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'unsloth_like[deepspeed]')")

_ZERO3 = "parameters partitioned by DeepSpeed ZeRO-3: PEFT's modules run, which gather them"


def _train(zoo_cache, out, nproc, per_device, zero=None):
    extra = () if zero is None else ("--zero", zero)
    run("sft_ddp.py", "--model", zoo_model_dir("llama", zoo_cache), "--out", out, "--per-device", per_device,
        *extra, nproc=nproc)
    return (json.loads((out / "losses.json").read_text()), torch.load(out / "adapter.pt"),
            json.loads((out / "fusion.json").read_text()))


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_trains_like_one_process_and_saves_once(zero, zoo_cache, tmp_path):
    one, adapter_one, _ = _train(zoo_cache, tmp_path / "one", None, 4)
    two, adapter_two, fusion = _train(zoo_cache, tmp_path / "two", 2, 2, zero=zero)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == 3 and one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
    assert adapter_one.keys() == adapter_two.keys() and adapter_one
    for name, weight in adapter_one.items():
        assert adapter_two[name].shape == weight.shape, name
        assert (adapter_two[name] - weight).abs().max() <= 1e-7, name
    merged_one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged").state_dict()
    merged_two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
    assert max((merged_one[k] - merged_two[k]).abs().max().item() for k in merged_one) <= 1e-7
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith(".")]
    assert fusion.pop("lm_head") == "trl"  # SFTTrainer's own fused head (ours inside it where the head is whole)
    assert set(fusion.values()) == ({"fused"} if zero == 2 else {_ZERO3})
