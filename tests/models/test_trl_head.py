"""Our CPU kernel under TRL's fused LM head (``models.trl_head``): on a model we patched, after
TRL's ``add_fused_lm_head``, a ``fused_lm_head=True`` call gives TRL's ``FusedCausalLMOutput`` field
for field (and the same gradients); other calls, and models we did not patch, are TRL's."""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip("this TRL has no fused LM head (added in TRL 1.11)", allow_module_level=True)
add_fused_lm_head = trl_utils.add_fused_lm_head

from unsloth_like.kernels import use_backend  # noqa: E402
from unsloth_like.models import patch_model  # noqa: E402
from unsloth_like.models.trl_head import take_over_fused_lm_head  # noqa: E402
from unsloth_like.testing.zoo import load_zoo_model  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _batch(vocab_cap: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_cap, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0  # a left-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt that is not scored
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_our_fused_head_gives_trls_output_and_gradients(zoo_cache, temperature):
    base, _ = load_zoo_model("qwen2", cache_dir=zoo_cache)
    patch_model(base)
    theirs = copy.deepcopy(base)
    for model in (base, theirs):
        add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    assert take_over_fused_lm_head(types.SimpleNamespace(model=base)) == 1
    assert take_over_fused_lm_head(types.SimpleNamespace(model=base)) == 0  # once
    batch = _batch(700)
    # TRL passes logits_to_keep only when the forward's signature shows it
    assert "logits_to_keep" in inspect.signature(base.forward).parameters
    head_calls = []
    base.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    with use_backend("torch"):
        ours_out = base(**batch, fused_lm_head=True)
        assert not head_calls  # the head's weight is read in chunks: no (batch, seq, vocab) logits
        trl_out = theirs(**batch, fused_lm_head=True)
        torch.testing.assert_close(ours_out.label_mask, trl_out.label_mask)
        for name in OUTPUTS:
            mine, reference = getattr(ours_out, name), getattr(trl_out, name)
            if name == "is_top1":
                assert torch.equal(mine, reference)
            else:
                torch.testing.assert_close(mine, reference, rtol=1e-5, atol=2e-5, msg=name)
        (ours_out.loss + ours_out.entropy.sum()).backward()
        (trl_out.loss + trl_out.entropy.sum()).backward()
    for (name, mine), (_, reference) in zip(base.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without fused_lm_head: TRL's wrapper, i.e. our forward with real logits
        torch.testing.assert_close(base(input_ids=batch["input_ids"]).logits,
                                   theirs(input_ids=batch["input_ids"]).logits)


def test_models_we_did_not_patch_keep_trls_head(zoo_cache):
    plain, _ = load_zoo_model("qwen2", cache_dir=zoo_cache)
    add_fused_lm_head(plain)
    trl_forward = plain.forward
    assert take_over_fused_lm_head(types.SimpleNamespace(model=plain, ref_model=None)) == 0
    assert plain.forward is trl_forward
    patched, _ = load_zoo_model("qwen2", cache_dir=zoo_cache)
    patch_model(patched)  # patched, but TRL never wrapped it: nothing to take over
    assert take_over_fused_lm_head(types.SimpleNamespace(model=patched)) == 0
