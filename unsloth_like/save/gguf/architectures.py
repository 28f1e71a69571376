"""Hugging Face decoder configs and tensors -> llama.cpp's architecture metadata and tensor names.

One ``Architecture`` per supported ``model_type``: which llama.cpp architecture it becomes, and
whether q/k weights need the rotary permutation. Tensor names come from the ``gguf`` package's
own map (``gguf.get_tensor_name_map``), so they are the names llama.cpp looks for.

Why the permutation: HF's Llama implementation rotates the two *halves* of each head
(``rotate_half``), while llama.cpp's ``llama`` architecture rotates adjacent *pairs*. The
original Meta checkpoints use pairs; HF's conversion script permuted q/k rows into halves, and
llama.cpp's converter permutes them back. Qwen2/Qwen3 run in llama.cpp with the "NEOX" (halves)
rotation, so their weights are written as they are.

The language models of vision-language families export here too, under their text config's
``model_type`` (the projector is ``mmproj.py``'s): Qwen2-VL / Qwen2.5-VL as ``qwen2vl`` and
Qwen3-VL as ``qwen3vl`` (M-RoPE: ``rope.dimension_sections`` is ``mrope_section`` padded to four,
as llama.cpp's converter pads it), Gemma 3 as ``gemma3``.

Gemma 2 and Gemma 3 (``gemma2``, ``gemma3``): their RMSNorms compute ``x * (1 + w)``, so, as the
converter does, every ``*norm.weight`` is written as ``w + 1``; the soft-capping values, the
sliding window and which layers use it are written; Gemma 3's local layers' RoPE base goes to
``rope.freq_base_swa``. llama.cpp never reads ``query_pre_attn_scalar`` (it derives the query scale
from the layer count), so a config whose scalar differs is refused.

Phi-3 / Phi-4 (``phi3``): the packed ``qkv_proj`` and ``gate_up_proj`` are written as they are
(``attn_qkv``, and ``ffn_up`` whose first half llama.cpp gates, as transformers does); partial
rotary is ``rope.dimension_count``; LongRoPE (Phi-3.5, Phi-4-mini) writes the short and long factor
tensors and the attention factor. llama.cpp picks the long factors by the context it is run with
(``n_ctx`` above the original context), transformers by the length of the sequence, so a short
prompt in a long llama.cpp context runs with the long factors where transformers uses the short.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import gguf
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's (1 + w) norms)
    mrope: bool = False  # multimodal RoPE: writes rope.dimension_sections


ARCHITECTURES = (
    # Mistral has no architecture of its own in llama.cpp: it is a Llama.
    Architecture(("llama", "mistral"), gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Architecture(("qwen2",), gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    Architecture(("qwen3",), gguf.MODEL_ARCH.QWEN3, permute_qk=False),
    # language models of vision-language families (the model_type of their text configs)
    Architecture(("qwen2_vl_text", "qwen2_5_vl_text"), gguf.MODEL_ARCH.QWEN2VL, permute_qk=False, mrope=True),
    Architecture(("qwen3_vl_text",), gguf.MODEL_ARCH.QWEN3VL, permute_qk=False, mrope=True),
    Architecture(("gemma3_text",), gguf.MODEL_ARCH.GEMMA3, permute_qk=False, norm_shift=1.0),
    Architecture(("gemma2",), gguf.MODEL_ARCH.GEMMA2, permute_qk=False, norm_shift=1.0),
    Architecture(("phi3",), gguf.MODEL_ARCH.PHI3, permute_qk=False),
)
_SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
_GEMMA = (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)


def architecture_for(config) -> Architecture:
    """The export recipe for ``config`` (a transformers config), or a clear error."""
    model_type = getattr(config, "model_type", None)
    for architecture in ARCHITECTURES:
        if model_type in architecture.model_types:
            return architecture
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise ValueError(f"GGUF export does not support model_type {model_type!r} yet; supported: {supported}. "
                     "Save with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py.")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """RoPE settings in transformers 5's ``rope_parameters`` form, from either config style; for
    configs with settings per layer type (Gemma 3), those of ``layer_type``."""
    params = _for_layer_type(getattr(config, "rope_parameters", None), layer_type)
    legacy = _for_layer_type(getattr(config, "rope_scaling", None), layer_type)
    for key, value in legacy.items():
        params.setdefault(key, value)
    params.setdefault("rope_type", params.pop("type", "default"))
    if getattr(config, "rope_theta", None) is not None:
        params.setdefault("rope_theta", config.rope_theta)
    params.setdefault("rope_theta", 10000.0)
    return params


def _for_layer_type(params, layer_type: str) -> dict:
    params = dict(params or {})
    if isinstance(params.get(layer_type), dict):
        return dict(params[layer_type])
    return {key: value for key, value in params.items() if not isinstance(value, dict)}


def check_supported(config) -> None:
    """Refuse, before any work, what llama.cpp would run differently from transformers."""
    architecture = architecture_for(config)
    for layer_type in sorted(set(getattr(config, "layer_types", None) or ["full_attention"])):
        rope = rope_parameters(config, layer_type)
        supported = _SUPPORTED_ROPE + (("longrope",) if architecture.arch == gguf.MODEL_ARCH.PHI3 else ())
        if rope["rope_type"] not in supported:
            raise ValueError(f"GGUF export does not support rope_type {rope['rope_type']!r} for {config.model_type}; "
                             f"supported: {', '.join(supported)}.")
    if architecture.mrope and not rope_parameters(config).get("mrope_section"):
        raise ValueError(f"{config.model_type} has no rope_parameters['mrope_section'], which llama.cpp's "
                         f"{gguf.MODEL_ARCH_NAMES[architecture.arch]} architecture needs.")
    if architecture.arch in _GEMMA:
        _check_gemma(config, architecture.arch)


# The one model size of each Gemma generation whose queries llama.cpp scales by 1/sqrt(hidden/heads)
# instead of 1/sqrt(head_dim), recognised by its layer count (the 27B models).
_HIDDEN_PER_HEAD_SCALE_LAYERS = {gguf.MODEL_ARCH.GEMMA2: 46, gguf.MODEL_ARCH.GEMMA3: 62}


def _check_gemma(config, arch: gguf.MODEL_ARCH) -> None:
    """What llama.cpp's gemma2/gemma3 architectures fix instead of reading from the file."""
    name, scalar, dim = gguf.MODEL_ARCH_NAMES[arch], getattr(config, "query_pre_attn_scalar", None), head_dim(config)
    hidden_per_head = config.num_hidden_layers == _HIDDEN_PER_HEAD_SCALE_LAYERS[arch]
    expected = config.hidden_size // config.num_attention_heads if hidden_per_head else dim
    if scalar is not None and scalar != expected:
        raise ValueError(f"This {config.model_type} model scales attention by query_pre_attn_scalar={scalar}, but "
                         f"llama.cpp's {name} architecture uses {expected} for a {config.num_hidden_layers}-layer "
                         "model, so the GGUF would compute different attention.")
    if arch == gguf.MODEL_ARCH.GEMMA3 and getattr(config, "attn_logit_softcapping", None):
        raise ValueError("llama.cpp's gemma3 architecture has no attention logit soft-capping; this config sets "
                         "attn_logit_softcapping.")


def write_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The ``<arch>.*`` keys llama.cpp reads to build the model."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(rotary_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))  # llama.cpp's default (10000) is wrong for most models
    _write_rope_scaling(writer, rope, config)
    architecture = architecture_for(config)
    if architecture.mrope:  # [temporal, height, width, extra], as llama.cpp's converter pads it
        sections = [int(s) for s in rope["mrope_section"]][:4]
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    if architecture.arch in _GEMMA:
        _write_gemma(writer, config, architecture.arch)
    if architecture.arch == gguf.MODEL_ARCH.PHI3:
        _write_phi3(writer, config)


def rotary_dim(config) -> int:
    """How many channels of each head rotate (Phi-4-mini's ``partial_rotary_factor`` is 0.75)."""
    factor = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim(config) * factor)


def _write_gemma(writer: gguf.GGUFWriter, config, arch: gguf.MODEL_ARCH) -> None:
    """Gemma's sliding-window keys: the window, which layers use it (without that list llama.cpp
    assumes the published models' pattern: every other layer for Gemma 2, 5 local and 1 global for
    Gemma 3), Gemma 3's local RoPE base; and the soft-capping values."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
        if layer_types:
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    if arch == gguf.MODEL_ARCH.GEMMA3 and "sliding_attention" in layer_types:
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
    if arch == gguf.MODEL_ARCH.GEMMA2 and getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _write_phi3(writer: gguf.GGUFWriter, config) -> None:
    """Phi-3's window as its converter writes it (0: none). llama.cpp reads it and then runs full
    attention anyway, so a windowed model differs from transformers past the window: said once."""
    window = getattr(config, "sliding_window", None) or 0
    writer.add_sliding_window(window)
    if window and window < config.max_position_embeddings:
        logger.warning("llama.cpp runs phi3 models with full attention: past %d tokens (this model's "
                       "sliding_window) the GGUF attends to the whole context where transformers attends to the "
                       "window.", window)


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict, config) -> None:
    kind, factor = rope["rope_type"], rope.get("factor")
    if kind == "longrope":
        original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(rope, config.max_position_embeddings, original))
        return
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
        attention_factor = rope.get("attention_factor", rope.get("attn_factor"))
        if attention_factor is not None:
            writer.add_rope_scaling_yarn_attn_factor(attention_factor)
    # llama3 scaling is a per-frequency factor tensor (``rope_freqs``), see ``extra_tensors``.


def longrope_attention_factor(rope: dict, max_positions: int, original: int) -> float:
    """transformers' LongRoPE attention factor: the config's, else ``sqrt(1 + ln s / ln original)``
    with ``s = max_positions / original`` (1 when the context is not extended)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = max_positions / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that a HF checkpoint does not hold: Llama 3.1's RoPE factors, or
    LongRoPE's short and long factors (one per rotary frequency)."""
    rope = rope_parameters(config)
    if rope["rope_type"] == "longrope":
        return {f"{gguf.TENSOR_NAMES[kind]}.weight": _longrope_factors(rope.get(key), rotary_dim(config))
                for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                                  (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))}
    if rope["rope_type"] != "llama3":
        return {}
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:  # between the two: interpolate smoothly, as transformers' llama3 rope does
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


class TensorNamer:
    """HF checkpoint keys -> GGUF tensor names, with the q/k permutation where it applies."""

    def __init__(self, architecture: Architecture, config):
        self.architecture, self.config = architecture, config
        self.names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def gguf_name(self, key: str) -> str | None:
        """The GGUF name of checkpoint tensor ``key``; None for what llama.cpp does not load
        (a tied lm_head copy, rotary caches)."""
        if key.endswith("rotary_emb.inv_freq") or (self.tied and key == "lm_head.weight"):
            return None
        name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"Tensor {key!r} has no llama.cpp counterpart in architecture "
                             f"{self.architecture.arch.name.lower()}; this checkpoint cannot be exported to GGUF.")
        return name

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.architecture.norm_shift and gguf_name.endswith("norm.weight"):
            return tensor.float() + self.architecture.norm_shift
        if not self.architecture.permute_qk:
            return tensor
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return _permute_rotary(tensor, self.config.num_attention_heads)
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            kv_heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
            return _permute_rotary(tensor, kv_heads)
        return tensor


def _longrope_factors(values, dim: int) -> torch.Tensor:
    if values is None or len(values) != dim // 2:
        raise ValueError(f"LongRoPE needs {dim // 2} factors (one per rotary frequency) in long_factor and "
                         f"short_factor, got {None if values is None else len(values)}.")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _permute_rotary(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows ``[x0 .. x(d/2-1), y0 .. y(d/2-1)]`` -> ``[x0, y0, x1, y1, ...]``."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)
