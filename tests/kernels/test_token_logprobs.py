"""token_log_probs (the CPU path for TRL's fused LM head) against full logits through autograd
(float64: the oracle) and against TRL's own ``ChunkedLogProbFunction`` (the contract): odd
shapes, several chunks, temperature, logit scale, softcap, bias, fp32 and bf16 inputs, every
output, and the hidden / weight / bias gradients of log-probs and entropy."""

from __future__ import annotations

import pytest
import torch

from unsloth_like.kernels.token_logprobs import OUTPUTS, token_log_probs, token_log_probs_reference

from .tolerances import assert_close_normwise

SETTINGS = [dict(), dict(temperature=0.7), dict(softcap=30.0, logit_scale=0.5), dict(temperature=1.3, softcap=5.0)]


def _inputs(dtype, rows=37, hidden=24, vocab=1009, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=generator)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=generator) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return h, w, b, targets


def _oracle(h, w, b, targets, **settings):
    """float64 copies through full logits; returns (values, grads of sum(lp * g1) + sum(ent * g2))."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    values = token_log_probs_reference(h64, w64, b64, targets, outputs=OUTPUTS, **settings)
    return values, (h64, w64, b64)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_full_logits_fp32_over_several_chunks(settings, bias):
    h, w, b, targets = _inputs(torch.float32, bias=bias)
    # chunk_bytes of 5 rows' logits: 37 rows in 8 chunks, the last one short
    values = token_log_probs(h, w, b, targets, outputs=OUTPUTS, chunk_bytes=5 * 1009 * 4, **settings)
    expected, leaves = _oracle(h, w, b, targets, **settings)
    for name, got, want in zip(OUTPUTS, values, expected):
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=name)
    g_lp, g_ent = torch.randn(37, generator=torch.Generator().manual_seed(1)), torch.randn(37)
    (values[0] * g_lp).sum().add((values[1] * g_ent).sum()).backward()
    (expected[0] * g_lp.double()).sum().add((expected[1] * g_ent.double()).sum()).backward()
    for leaf, oracle in zip((h, w, b), leaves):
        if leaf is not None:
            assert_close_normwise(leaf.grad, oracle.grad.float(), torch.float32, factor=2.0)


def test_log_probs_only_needs_no_entropy_and_frozen_weight_gets_no_gradient():
    h, w, _, targets = _inputs(torch.float32)
    w.requires_grad_(False)
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = token_log_probs(h, w, None, targets)
    assert entropy is None and log_sum_sq is None and mean_logits is None and is_top1 is None
    log_probs.sum().backward()
    assert w.grad is None and h.grad is not None
    expected, (h64, _, _) = _oracle(h, w, None, targets)
    expected[0].sum().backward()
    assert_close_normwise(h.grad, h64.grad.float(), torch.float32, factor=2.0)


def test_bf16_inputs_match_the_oracle_to_bf16_rounding():
    h, w, _, targets = _inputs(torch.bfloat16, rows=19, vocab=515)
    log_probs, entropy, *_ = token_log_probs(h, w, None, targets, outputs=("entropy",), chunk_bytes=4 * 515 * 4)
    expected, (h64, w64, _) = _oracle(h, w, None, targets)
    # inputs are exactly bf16; the matmul rounds its (bf16) output: logits carry ~2^-8 relative error
    torch.testing.assert_close(log_probs.double(), expected[0], rtol=2**-6, atol=0.1)
    (log_probs.sum() + entropy.sum()).backward()
    (expected[0].sum() + expected[1].sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert_close_normwise(h.grad.float(), h64.grad.float(), torch.bfloat16, factor=2.0)
    assert_close_normwise(w.grad.float(), w64.grad.float(), torch.bfloat16, factor=2.0)


@pytest.mark.parametrize("settings", SETTINGS)
def test_same_values_and_gradients_as_trls_chunked_log_prob_function(settings):
    kernels = pytest.importorskip("trl.kernels")
    h, w, b, targets = _inputs(torch.float32, bias=True)
    ours = token_log_probs(h, w, b, targets, outputs=OUTPUTS, **settings)
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (h, w, b))
    theirs = kernels.ChunkedLogProbFunction.apply(h2, w2, b2, targets, settings.get("temperature", 1.0), 256,
                                                  settings.get("softcap"), settings.get("logit_scale", 1.0),
                                                  OUTPUTS[1:])
    for name, a, c in zip(OUTPUTS, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=2e-5, msg=name)
    (ours[0].sum() - ours[1].sum()).backward()
    (theirs[0].sum() - theirs[1].sum()).backward()
    for mine, trl_leaf in ((h, h2), (w, w2), (b, b2)):
        assert_close_normwise(mine.grad, trl_leaf.grad, torch.float32, factor=2.0)


def test_bad_arguments_are_refused():
    h, w, _, targets = _inputs(torch.float32, rows=4, vocab=11)
    with pytest.raises(ValueError, match="outputs"):
        token_log_probs(h, w, None, targets, outputs=("logits",))
    with pytest.raises(ValueError, match="targets"):
        token_log_probs(h, w, None, targets[:2])
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(h, w, None, targets, temperature=0.0)
