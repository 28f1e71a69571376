"""Per-instance patching: bind our forwards to the modules of one model object, and undo it.

Nothing here touches a transformers class. Each patched module gets an instance attribute
``forward`` (a bound method) that shadows its class's ``forward`` for that object alone; a plain
model created in the same process keeps upstream behaviour. ``unpatch`` deletes those attributes.
Modules carrying an accelerate hook (``device_map`` dispatch) keep their hook: the hook's saved
``_old_forward`` is what gets replaced and restored.
"""

from __future__ import annotations

import logging
import types

from torch import nn

from .causal_lm import make_causal_lm_forward
from .llama import MLP_ACTIVATIONS, layer_norm_forward, make_attention_forward, make_mlp_forward, make_rms_norm_forward
from .lora_fusion import MLP, PACKED_MLP, PACKED_QKV, QKV, attach_fusion_log, detach_fusion_log, fusion_report
from .registry import PatchSpec, spec_for, vision_spec_for

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_unsloth_like_patched"  # list of (module, attribute name, previous value or None, ours)


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(_root(model), _PATCHED_ATTR, None))


def patch_model(model: nn.Module) -> PatchSpec | None:
    """Patch ``model`` (a CausalLM, or a PEFT model around one) in place; returns the spec used.

    Returns None, with a warning naming the kernels not applied, for an architecture we have no
    spec for: the model still runs and trains with upstream code.
    """
    root = _root(model)
    model_type = root.config.model_type
    spec = spec_for(model_type)
    if spec is None:
        logger.warning(
            "unsloth_like has no patch for model_type %r; it runs with upstream code (kernels not "
            "applied: rms_norm, apply_rope, swiglu, fused_linear_cross_entropy).", model_type)
        return None
    if is_patched(root):
        return spec
    records: list = []
    activation = _mlp_activation(root.config.get_text_config())
    norm_forward, attention_forward = make_rms_norm_forward(spec), make_attention_forward(spec)
    mlp_forward = make_mlp_forward(MLP_ACTIVATIONS[activation], spec) if activation in MLP_ACTIVATIONS else None
    vision = vision_spec_for(model_type) is not None
    for module in root.modules():
        name = type(module).__name__
        if name == spec.norm:
            _bind(module, norm_forward, records)
        elif name == spec.attention:
            _bind(module, attention_forward, records)
        elif name == spec.mlp and mlp_forward is not None:
            _bind(module, mlp_forward, records)
        elif vision and type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            _bind(module, layer_norm_forward, records)  # the vision tower's: an exact kernel
    attach_fusion_log(lora_groups(model))
    if mlp_forward is None:
        logger.warning("hidden_act %r has no fused kernel here; the MLP runs upstream code.", activation)
    if root.get_output_embeddings() is not None:  # a language-model head (not a classifier's score)
        _bind(root, make_causal_lm_forward(type(root).forward, spec.softcap_logits), records)
    setattr(root, _PATCHED_ATTR, records)
    return spec


def _mlp_activation(text_config) -> str:
    """The MLP activation as the config names it (Gemma configs call it ``hidden_activation``)."""
    return getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", "silu")


def unpatch(model: nn.Module) -> None:
    """Restore the upstream forwards of every module ``patch_model`` touched."""
    root = _root(model)
    _unbind(getattr(root, _PATCHED_ATTR, None) or [])
    if _PATCHED_ATTR in root.__dict__:
        del root.__dict__[_PATCHED_ATTR]
    detach_fusion_log(root)


def lora_groups(model: nn.Module) -> dict:
    """The fused-LoRA groups of a patched model: ``{name: (owner module, projection names)}``,
    e.g. ``"model.layers.0.self_attn.qkv"`` -> the attention module and ``("q_proj", "k_proj",
    "v_proj")`` (``("qkv_proj",)`` for packed projections). Names are relative to ``model`` as given
    (a PEFT model's include its prefix)."""
    spec = spec_for(_root(model).config.model_type)
    groups = {}
    if spec is None:
        return groups
    qkv, mlp = (PACKED_QKV, PACKED_MLP) if spec.packed_projections else (QKV, MLP)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == spec.attention and _is_bound(module):
            groups[f"{name}.qkv"] = (module, qkv)
            groups[f"{name}.o_proj"] = (module, ("o_proj",))
        elif kind == spec.mlp and _is_bound(module):
            groups[name] = (module, mlp)
    return groups


def _is_bound(module: nn.Module) -> bool:
    return any(isinstance(module.__dict__.get(a), types.MethodType) for a in ("forward", "_old_forward"))


def lora_fusion_report(model: nn.Module) -> dict[str, str]:
    """For each attention/MLP projection group: ``"fused"`` or why PEFT's modules run instead."""
    return fusion_report(lora_groups(model))


def _bind(module: nn.Module, function, records: list) -> None:
    # accelerate's hooks move the original forward to `_old_forward` and call it from theirs.
    attribute = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    bound = types.MethodType(function, module)
    records.append((module, attribute, module.__dict__.get(attribute), bound))
    setattr(module, attribute, bound)


def _unbind(records: list) -> None:
    """Undo ``_bind`` calls, newest first: each attribute gets back what it had (or is removed).
    An attribute someone replaced after us (TRL's fused LM head wraps the model's ``forward``) is
    theirs now, and is left as it is. Records of three items (an attribute set without ``_bind``)
    are restored unconditionally."""
    for module, attribute, previous, *ours in reversed(records):
        if ours and module.__dict__.get(attribute) is not ours[0]:
            continue
        if previous is None:
            del module.__dict__[attribute]
        else:
            setattr(module, attribute, previous)


def _root(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
