"""Phi-3 / Phi-3.5 / Phi-4 (``Phi3ForCausalLM``): the Llama shape with packed projections.

Phi-3 keeps q, k and v in one ``qkv_proj`` (rows ``[q | k | v]``) and the MLP's gate and up in one
``gate_up_proj`` (rows ``[gate | up]``); everything else (RMSNorm with Llama's cast order, rotary
embeddings, partial for Phi-4-mini, the attention call) is ``models.llama``'s. Here live the two
packed pieces that differ:

* ``packed_qkv``: one projection, split like upstream;
* ``make_packed_mlp_forward``: ``down_proj(act(gate) * up)`` with ``gate, up`` the halves of
  ``gate_up_proj``'s output.

Under LoRA, the adapters sit on the packed modules (``qkv_proj``, ``gate_up_proj``), so the fused
path runs each packed projection through ``kernels.lora`` (one LoRA projection, NF4 dequantised on
the fly), then our gated activation, then ``down_proj``: exactly PEFT's maths, in three calls
instead of the one fused gated-MLP call of separate gate/up layers (which would need the packed
NF4 weight split by rows). ``packed_target_modules`` lets users pass Llama's names.
"""

from __future__ import annotations

import logging

import torch

from .lora_fusion import fused_packed_mlp, fused_packed_qkv

logger = logging.getLogger(__name__)

# packed module -> the Llama-style names users pass for it
PACKED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def packed_qkv(attention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v from ``qkv_proj`` (fused LoRA when it applies), split where upstream splits."""
    qkv = fused_packed_qkv(attention, hidden_states)
    if qkv is None:
        qkv = attention.qkv_proj(hidden_states)
    q_size = attention.config.num_attention_heads * attention.head_dim
    kv_size = attention.num_key_value_heads * attention.head_dim
    return qkv.split([q_size, kv_size, kv_size], dim=-1)


def make_packed_mlp_forward(gate):
    """The MLP forward for packed gate/up; ``gate(g, u)`` is the gated activation kernel."""

    def packed_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_packed_mlp(self, x, gate)
        if fused is not None:
            return fused
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(gate(g, u))

    return packed_mlp_forward


def packed_target_modules(module_names: list[str], target_modules: list[str]) -> list[str]:
    """``target_modules`` with Llama's names replaced by the packed module that holds them, for a
    model that has the packed module and not the separate ones. An adapter on a packed module
    covers all its parts, so naming only some of them (``["q_proj", "v_proj"]``) gets a warning."""
    present = {name.rsplit(".", 1)[-1] for name in module_names}
    result = list(target_modules)
    for packed, parts in PACKED_NAMES.items():
        named = [t for t in result if t in parts]
        if not named or packed not in present or any(p in present for p in parts):
            continue
        if len(named) < len(parts):
            logger.warning("This model packs %s into one %s layer: target_modules %s put a LoRA adapter on "
                           "%s, which covers %s too.", "/".join(parts), packed, named, packed,
                           ", ".join(p for p in parts if p not in named))
        result = [t for t in result if t not in parts]
        if packed not in result:
            result.append(packed)
    return result
