"""apply_rope: Triton kernel (interpreted on CPU) vs torch reference; reference vs HF."""

from __future__ import annotations

import pytest
import torch

from unsloth_like.kernels import apply_rope, apply_rope_reference

from .tolerances import assert_close_dtype, assert_close_normwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rope_table(n_positions, rotary_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _qk(batch, q_heads, k_heads, seq, head_dim, dtype, seed=0):
    """q/k as HF attention makes them: a projection viewed (b, s, h, d) then transposed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, q_heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, k_heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    return q.to(_device()), k.to(_device())


def _run(fn, q, k, cos, sin, position_ids=None, **kwargs):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = fn(q, k, cos, sin, position_ids, **kwargs)
    g = torch.Generator().manual_seed(7)
    dq = torch.randn(q_out.shape, generator=g).to(q_out)
    dk = torch.randn(k_out.shape, generator=g).to(k_out)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out, k_out, q.grad, k.grad


def _check(q, k, cos, sin, position_ids=None):
    got = _run(apply_rope, q, k, cos, sin, position_ids)
    want = _run(apply_rope_reference, q, k, cos, sin, position_ids)
    for actual, expected in zip(got, want):
        assert actual.dtype == expected.dtype
        # HF rounds q*cos and rotate(q)*sin to the dtype before adding them; where the two
        # products cancel, that rounding (an ulp of the *products*) dominates the small result,
        # so elementwise relative error is unbounded: compare norm-wise instead.
        assert_close_normwise(actual, expected, actual.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "q_heads, k_heads, head_dim, rotary_dim",
    [(4, 4, 64, 64), (8, 2, 48, 48), (8, 1, 64, 64), (5, 1, 48, 48), (4, 2, 64, 32), (6, 2, 80, 24)],
    ids=["mha", "gqa4", "gqa8", "gqa5-odd-heads", "partial-half", "partial-odd"],
)
def test_matches_reference_with_per_token_cos_sin(dtype, q_heads, k_heads, head_dim, rotary_dim):
    q, k = _qk(2, q_heads, k_heads, 7, head_dim, dtype)
    cos, sin = _rope_table(7, rotary_dim)
    cos = cos.unsqueeze(0).expand(2, -1, -1).to(dtype).to(_device())  # (batch, seq, rot) as HF returns
    sin = sin.unsqueeze(0).expand(2, -1, -1).to(dtype).to(_device())
    _check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences_with_position_ids(dtype):
    q, k = _qk(2, 4, 2, 9, 64, dtype)
    cos, sin = (t.to(_device()) for t in _rope_table(32, 64))  # fp32 table, gathered in the kernel
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11, 12, 13]], device=_device())
    _check(q, k, cos, sin, position_ids)
    _check(q, k, cos, sin, position_ids[:1])  # one row of positions shared by the batch


def test_two_dimensional_cos_broadcasts_over_batch():
    q, k = _qk(3, 4, 2, 5, 32, torch.float32)
    cos, sin = (t.to(_device()) for t in _rope_table(5, 32))
    _check(q, k, cos, sin)


def test_cos_with_unequal_halves_is_still_exact():
    q, k = _qk(1, 2, 2, 4, 16, torch.float32)
    g = torch.Generator().manual_seed(3)
    cos, sin = torch.randn(4, 16, generator=g).to(_device()), torch.randn(4, 16, generator=g).to(_device())
    _check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_hf_apply_rotary_pos_emb_bit_for_bit(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config)
    q, k = _qk(2, 4, 2, 6, 64, dtype)
    position_ids = torch.arange(6).unsqueeze(0).expand(2, -1)
    cos, sin = rotary(q, position_ids)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    got = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_inplace_writes_into_q_and_k_and_keeps_gradients_right():
    x = torch.randn(2, 5, 3 * 32, requires_grad=True, device=_device())  # fused qkv-like projection
    cos, sin = (t.to(_device()) for t in _rope_table(5, 32))

    def rotated(inplace, fn):
        proj = x * 2.0  # a fresh, non-leaf activation, as q_proj's output would be
        q = proj[..., :64].view(2, 5, 2, 32).transpose(1, 2)
        k = proj[..., 64:].view(2, 5, 1, 32).transpose(1, 2)
        q_out, k_out = fn(q, k, cos, sin, inplace=inplace)
        if inplace:
            assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
        return q_out, k_out

    q_in, k_in = rotated(True, apply_rope)
    (q_in.square().sum() + k_in.sum()).backward()
    grad_inplace, x.grad = x.grad.clone(), None
    q_ref, k_ref = rotated(False, apply_rope_reference)
    (q_ref.square().sum() + k_ref.sum()).backward()
    assert_close_dtype(q_in, q_ref)
    assert_close_normwise(grad_inplace, x.grad, torch.float32)


def test_only_q_used_still_backpropagates():
    q, k = _qk(1, 2, 1, 3, 16, torch.float32)
    q.requires_grad_(True)
    cos, sin = (t.to(_device()) for t in _rope_table(3, 16))
    q_out, _ = apply_rope(q, k, cos, sin)
    q_out.sum().backward()
    q_ref = q.detach().clone().requires_grad_(True)
    apply_rope_reference(q_ref, k, cos, sin)[0].sum().backward()
    assert_close_dtype(q.grad, q_ref.grad)


def test_reference_gradcheck_float64():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in _rope_table(3, 6))  # partial rotary
    assert torch.autograd.gradcheck(lambda a, b: apply_rope_reference(a, b, cos, sin), (q, k))


def _bad(**overrides):
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = _rope_table(5, 16)
    args = {"q": q, "k": k, "cos": cos, "sin": sin, "position_ids": None}
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, message",
    [
        (_bad(q=torch.randn(2, 5, 16)), "must be 4-D"),
        (_bad(k=torch.randn(2, 2, 6, 16)), r"k must have shape \(2, kv_heads, 5, 16\)"),
        (_bad(k=torch.randn(2, 2, 5, 16).half()), "same dtype"),
        (_bad(cos=torch.randn(5, 15), sin=torch.randn(5, 15)), "must be even"),
        (_bad(cos=torch.randn(5, 18), sin=torch.randn(5, 18)), "must be even and in"),
        (_bad(cos=torch.randn(6, 16), sin=torch.randn(6, 16)), r"cos must have shape \(5, 16\)"),
        (_bad(sin=torch.randn(5, 8)), "same shape"),
        (_bad(position_ids=torch.zeros(5)), "int32/int64"),
        (_bad(position_ids=torch.zeros(3, 5, dtype=torch.long)), "position_ids must have shape"),
        (_bad(cos=torch.randn(5, 16).requires_grad_(True)), "does not differentiate cos/sin"),
        (_bad(k=torch.empty(2, 2, 5, 16, device="meta")), "one device"),
    ],
)
def test_bad_input_is_a_clear_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        apply_rope(**args)


def test_inplace_on_leaf_requiring_grad_is_refused():
    args = _bad()
    args["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="inplace=True cannot modify leaf"):
        apply_rope(**args, inplace=True)
