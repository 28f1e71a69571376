"""Training forwards for the Llama-shaped decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3 with ``models.phi3``'s packed projections, and the language decoders of Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Gemma 3 and Llama 3.2 Vision).

Each function here is bound to *one module instance* by ``models.patching`` and replaces that
instance's ``forward``; the classes in transformers are never touched. They compute exactly what
upstream computes, through our kernels:

* RMSNorm -> ``kernels.rms_norm`` (HF's Llama cast order, or Gemma's fp32 ``(1 + weight)``),
  also the per-head q/k norms of Qwen3 and Gemma 3;
* attention -> upstream's structure with ``kernels.apply_rope`` on q and k, then the attention
  implementation the model was loaded with (SDPA by default; flash-attention when configured),
  through transformers' own attention-function registry, so masks, padding, packed sequences
  and the KV cache behave as upstream;
* gated MLP -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (GeGLU with tanh-GELU for Gemma);
* a VLM's ``nn.LayerNorm`` modules (its vision tower's) -> ``kernels.layer_norm``.

Projections under LoRA take the fused path (``kernels.lora``: QKV in one read of X, O, and the
whole gated MLP) whenever ``lora_fusion`` finds it an exact replacement for PEFT's modules;
otherwise they are called as modules (``self.q_proj(x)``), so PEFT's layers run unchanged.
"""

from __future__ import annotations

import sys

import torch

from ..kernels import apply_rope, geglu, layer_norm, rms_norm, swiglu
from .lora_fusion import fused_mlp, fused_o, fused_qkv
from .phi3 import make_packed_mlp_forward, packed_qkv
from .registry import PatchSpec

# transformers' activation names -> ours (kernels.swiglu / kernels.lora); others run upstream code
MLP_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def make_rms_norm_forward(spec: PatchSpec):
    """Llama-style norms keep ``variance_epsilon``; Gemma's keep ``eps`` and add 1 to the weight."""
    if spec.norm_offset == 0.0:
        def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    else:
        def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return rms_norm(hidden_states, self.weight, self.eps, spec.norm_offset)
    return rms_norm_forward


def layer_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm`` over the last dimension (vision towers of the VLM families)."""
    return layer_norm(hidden_states, self.weight, self.bias, self.eps)


def gated_activation(activation: str):
    """``gate(g, u)``: the gated-activation kernel for one of ``MLP_ACTIVATIONS``' values."""
    if activation == "silu":
        def gate(g, u):
            return swiglu(g, u)
    else:
        def gate(g, u):
            return geglu(g, u, approximate="tanh")
    return gate


def make_mlp_forward(activation: str, spec: PatchSpec):
    """The gated MLP for one of ``MLP_ACTIVATIONS``' values (packed gate/up: ``models.phi3``)."""
    gate = gated_activation(activation)
    if spec.packed_projections:
        return make_packed_mlp_forward(gate)

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_mlp(self, x, activation)
        if fused is not None:
            return fused
        return self.down_proj(gate(self.gate_proj(x), self.up_proj(x)))

    return mlp_forward


def make_attention_forward(spec: PatchSpec):
    """The attention forward for one architecture (sliding window, q/k norm, soft-capping and
    packed q/k/v differ)."""
    project_qkv = packed_qkv if spec.packed_projections else _separate_qkv

    def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape) for t in project_qkv(self, hidden_states))
        if spec.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rope(query, key, cos, sin)

        cache = _pop_cache(args, kwargs)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        upstream_eager = sys.modules[type(self).__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, upstream_eager)
        extra = {}
        if spec.sliding_window == "config":
            extra["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif spec.sliding_window == "module":
            extra["sliding_window"] = self.sliding_window
        if spec.softcap_attention:
            extra["softcap"] = self.attn_logit_softcapping
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else _dropout(self),
            scaling=self.scaling, **extra, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        output = fused_o(self, attn_output)
        return (self.o_proj(attn_output) if output is None else output), attn_weights

    return attention_forward


def _separate_qkv(attention, hidden_states: torch.Tensor):
    qkv = fused_qkv(attention, hidden_states)
    if qkv is None:
        qkv = attention.q_proj(hidden_states), attention.k_proj(hidden_states), attention.v_proj(hidden_states)
    return qkv


def _dropout(attention) -> float:
    """The attention dropout probability (Mllama's text attention names it ``dropout``)."""
    value = getattr(attention, "attention_dropout", None)
    return getattr(attention, "dropout", 0.0) if value is None else value


def _pop_cache(args: tuple, kwargs: dict):
    """The KV cache, however this transformers version passes it (``cache`` in recent releases,
    ``past_key_values`` before; positional after the mask), removed from ``kwargs`` because the
    attention function must not receive it (upstream takes it as a named parameter)."""
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in kwargs:
            return kwargs.pop(name)
    return args[0] if args else None
