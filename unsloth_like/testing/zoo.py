"""Tiny real models for tests, benchmarks, notebooks and the demo: no hub, no downloads.

Each zoo entry is a real Hugging Face architecture (the same classes a user's checkpoint loads
into) with seeded random weights and deliberately awkward sizes: hidden sizes that are not
powers of two, vocabularies such as 32003, grouped-query attention, ``head_dim`` different from
``hidden / heads`` where the architecture allows it, tied and untied embeddings, qkv bias,
q/k norm. Models are written with ``save_pretrained`` next to a tokenizer trained on the fly
(``testing.tokenizer``), so everything downstream exercises the real loading code. The
vision-language entries (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Llama 3.2 Vision) also save their
family's real processor (``testing.processors``), so ``AutoProcessor.from_pretrained`` works on them
and image batches go through the real preprocessing.

``zoo_model_dir(name)`` builds a model once and reuses it: directories are cached under a key
derived from the full spec and the transformers version, and written atomically, so concurrent
test workers never see half a model.

Vocabulary note: the embedding matrices are larger than the trained tokenizers (as in real
Qwen/Llama checkpoints whose embeddings are padded past the tokenizer's length); the extra rows
are never produced by the tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .tokenizer import TOKENIZERS, TokenizerSpec, save_tokenizer

ZOO_FORMAT_VERSION = 2  # bump when the way zoo directories are written changes (2: VLM processors)


@dataclass(frozen=True)
class ZooSpec:
    """A zoo model: its transformers config class and arguments, tokenizer and seed."""

    name: str
    config_class: str  # attribute of ``transformers``
    config: dict[str, Any]
    tokenizer: str  # key of ``testing.tokenizer.TOKENIZERS``
    seed: int = 1234
    is_vlm: bool = False
    # Token-id config fields filled from the tokenizer, e.g. {"image_token_id": "<|image_pad|>"}.
    token_fields: dict[str, str] = field(default_factory=dict)
    # VLMs: settings of the saved processor on top of what the model config implies
    # ({"image": image-processor kwargs, "video": video-processor kwargs}; see testing.processors).
    processor: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Parameters (full-name regex -> std of a seeded normal init) that transformers initialises to
    # zero where real checkpoints hold trained values, e.g. mllama's tanh gates: left at zero, the
    # image would never reach the logits and the vision weights would get no gradient.
    nonzero_init: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        return TOKENIZERS[self.tokenizer]

    @property
    def model_type(self) -> str:
        import transformers

        return getattr(transformers, self.config_class).model_type

    def cache_key(self) -> str:
        import transformers

        payload = {
            "format": ZOO_FORMAT_VERSION,
            "transformers": transformers.__version__,
            "spec": asdict(self),
            "tokenizer": asdict(self.tokenizer_spec),
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.name}-{digest}"


_COMMON = {"num_hidden_layers": 2, "max_position_embeddings": 2048, "initializer_range": 0.02}

# Qwen-VL image/video processors: pixel budgets small enough that a 56x56 image is one 4x4 grid of
# patches (2x2 merged tokens); max 16 merged tokens per image or frame.
_QWEN2_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16}
_QWEN3_PIXELS = {"min_pixels": 64 * 64, "max_pixels": 32 * 32 * 16}
_QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}

ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in [
        ZooSpec(
            name="llama",
            config_class="LlamaConfig",
            config={**_COMMON, "num_hidden_layers": 3, "vocab_size": 32003, "hidden_size": 200,
                    "intermediate_size": 344, "num_attention_heads": 5, "num_key_value_heads": 1,
                    "head_dim": 48, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
            tokenizer="llama3",
            notes="untied, GQA 5:1, head_dim 48 != 200/5, 3 layers, Llama-3 tokenizer (BOS added)",
        ),
        ZooSpec(
            name="mistral",
            config_class="MistralConfig",
            config={**_COMMON, "vocab_size": 32768, "hidden_size": 176, "intermediate_size": 320,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
                    "sliding_window": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            tokenizer="spm",
            notes="GQA 2:1, head_dim 48 != 176/4, SentencePiece-style tokenizer without a pad token",
        ),
        ZooSpec(
            name="qwen2",
            config_class="Qwen2Config",
            config={**_COMMON, "vocab_size": 16387, "hidden_size": 176, "intermediate_size": 304,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                    "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            tokenizer="qwen2",
            notes="tied embeddings, qkv bias, GQA 2:1, head_dim 44, vocab 16387 = 2^14 + 3",
        ),
        ZooSpec(
            name="qwen3",
            config_class="Qwen3Config",
            config={**_COMMON, "vocab_size": 12289, "hidden_size": 144, "intermediate_size": 272,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                    "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            tokenizer="qwen2",
            notes="q/k RMSNorm, head_dim 64 != 144/4, untied, GQA 2:1",
        ),
        ZooSpec(
            name="phi3",
            config_class="Phi3Config",
            config={**_COMMON, "vocab_size": 1033, "hidden_size": 160, "intermediate_size": 296,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "sliding_window": None, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0,
                                        "partial_rotary_factor": 0.75}},
            tokenizer="phi4",
            notes="Phi-4-mini's shape (Phi3ForCausalLM): packed qkv_proj and gate_up_proj, partial rotary "
                  "(30 of head_dim 40), GQA 2:1, tied, Phi-4's byte-level tokenizer and chat template",
        ),
        ZooSpec(
            name="gemma2",
            config_class="Gemma2Config",
            config={**_COMMON, "vocab_size": 1031, "hidden_size": 152, "intermediate_size": 296,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40, "query_pre_attn_scalar": 40,
                    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                    "tie_word_embeddings": True},
            tokenizer="gemma3",
            notes="Gemma 2 (Gemma2ForCausalLM): (1 + w) RMSNorms before and after attention and MLP, GeGLU "
                  "(tanh), attention and final-logit soft-capping, head_dim 40 != 152/4, one sliding (window "
                  "16) and one full layer, tied, SentencePiece-style tokenizer; loads with eager attention",
        ),
        ZooSpec(
            name="gemma3_text",
            config_class="Gemma3TextConfig",
            config={**_COMMON, "vocab_size": 1043, "hidden_size": 136, "intermediate_size": 304,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48, "query_pre_attn_scalar": 48,
                    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                    "tie_word_embeddings": True},
            tokenizer="gemma3",
            notes="Gemma 3 text (Gemma3ForCausalLM): (1 + w) RMSNorms, q/k norms, GeGLU (tanh), embeddings "
                  "scaled by sqrt(hidden), head_dim 48 != 136/4, one sliding (window 16, RoPE base 1e4) and one "
                  "full layer (base 1e6), tied, SentencePiece-style tokenizer",
        ),
        ZooSpec(
            name="qwen2_vl",
            config_class="Qwen2VLConfig",
            config={
                "text_config": {**_COMMON, "vocab_size": 16387, "hidden_size": 192,
                                "intermediate_size": 320, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "tie_word_embeddings": True,
                                "rms_norm_eps": 1e-6,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [8, 8, 8]}},
                "vision_config": {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2,
                                  "hidden_size": 192, "patch_size": 14, "spatial_merge_size": 2,
                                  "temporal_patch_size": 2, "in_channels": 3},
                "tie_word_embeddings": True,
            },
            tokenizer="qwen2",
            is_vlm=True,
            token_fields=_QWEN_TOKENS,
            processor={"image": _QWEN2_PIXELS, "video": {**_QWEN2_PIXELS, "cap_pixels_per_frame": True}},
            notes="Qwen2-VL: 2-block ViT (embed 64), M-RoPE sections 8/8/8, tied embeddings; "
                  "56x56 image = grid 1x4x4 = 4 tokens",
        ),
        ZooSpec(
            name="qwen2_5_vl",
            config_class="Qwen2_5_VLConfig",
            config={
                "text_config": {**_COMMON, "vocab_size": 1031, "hidden_size": 176,
                                "intermediate_size": 304, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "tie_word_embeddings": False,
                                "rms_norm_eps": 1e-6,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [6, 8, 8]}},
                # window_size 56 = 2 merged 28-pixel units per window side; block 1 attends fully.
                "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 112, "num_heads": 4,
                                  "hidden_act": "silu", "out_hidden_size": 176, "patch_size": 14,
                                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                                  "window_size": 56, "fullatt_block_indexes": [1]},
                "tie_word_embeddings": False,
            },
            tokenizer="qwen2",
            is_vlm=True,
            token_fields=_QWEN_TOKENS,
            processor={"image": _QWEN2_PIXELS, "video": {**_QWEN2_PIXELS, "cap_pixels_per_frame": True}},
            notes="Qwen2.5-VL: SwiGLU ViT with window attention (window 56) and one full-attention block, "
                  "M-RoPE 6/8/8 (head_dim 44), untied, vocab 1031",
        ),
        ZooSpec(
            name="qwen3_vl",
            config_class="Qwen3VLConfig",
            config={
                "text_config": {**_COMMON, "vocab_size": 1057, "hidden_size": 160,
                                "intermediate_size": 288, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True,
                                "rms_norm_eps": 1e-6,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [12, 10, 10], "mrope_interleaved": True}},
                # 36 = 6x6 learned position embeddings, interpolated to each image's patch grid.
                "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 144, "num_heads": 4,
                                  "hidden_act": "gelu_pytorch_tanh", "out_hidden_size": 160, "patch_size": 16,
                                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                                  "num_position_embeddings": 36, "deepstack_visual_indexes": [0]},
                "tie_word_embeddings": True,
            },
            tokenizer="qwen2",
            is_vlm=True,
            token_fields=_QWEN_TOKENS,
            processor={"image": {**_QWEN3_PIXELS, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
                       "video": {"size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 64},
                                 "cap_pixels_per_frame": True}},
            notes="Qwen3-VL: q/k norm, head_dim 64 != 160/4, interleaved M-RoPE 12/10/10, ViT patch 16 with "
                  "learned 6x6 position embeddings and a deepstack merger after block 0, tied",
        ),
        ZooSpec(
            name="gemma3",
            config_class="Gemma3Config",
            config={
                "text_config": {**_COMMON, "vocab_size": 1043, "hidden_size": 136, "intermediate_size": 304,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
                                "query_pre_attn_scalar": 48, "hidden_activation": "gelu_pytorch_tanh",
                                "rms_norm_eps": 1e-6, "sliding_window": 16,
                                "layer_types": ["sliding_attention", "full_attention"],
                                "rope_parameters": {
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                                "tie_word_embeddings": True},
                # SigLIP without its pooling head (as Gemma 3 ships it): 56/14 = 4x4 patches,
                # average-pooled 2x2 into mm_tokens_per_image = 4 soft tokens.
                "vision_config": {"hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
                                  "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                                  "vision_use_head": False},
                "mm_tokens_per_image": 4,
                "tie_word_embeddings": True,
            },
            tokenizer="gemma3",
            is_vlm=True,
            token_fields={"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                          "image_token_index": "<image_soft_token>"},
            # transformers zero-initialises the projection matrix (images would not reach the text).
            nonzero_init={r"model\.multi_modal_projector\.mm_input_projection_weight": 0.02},
            notes="Gemma 3: GeGLU, head_dim 48 != 136/4, one sliding (window 16) and one full layer, "
                  "SigLIP 56px without head, 4 soft tokens per image, SentencePiece-style tokenizer",
        ),
        ZooSpec(
            name="mllama",
            config_class="MllamaConfig",
            config={
                "text_config": {**_COMMON, "num_hidden_layers": 3, "vocab_size": 877, "hidden_size": 200,
                                "intermediate_size": 344, "num_attention_heads": 5, "num_key_value_heads": 1,
                                "rms_norm_eps": 1e-5, "cross_attention_layers": [1],
                                "tie_word_embeddings": False,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
                # 28px tiles of 2x2 patches (+ class token), at most 2 tiles per image;
                # vision_output_dim = hidden * (1 + len(intermediate_layers_indices)).
                "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_global_layers": 1, "attention_heads": 4, "image_size": 28,
                                  "patch_size": 14, "max_num_tiles": 2,
                                  "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
                                  "intermediate_layers_indices": [0, 1], "vision_output_dim": 192,
                                  "norm_eps": 1e-5},
            },
            tokenizer="llama3_vision",
            is_vlm=True,
            token_fields={"image_token_index": "<|image|>"},
            # tanh gates, zero-initialised by transformers: the cross-attention layer's attention and
            # MLP outputs, and the vision tower's positional/tile embeddings, would all be multiplied by 0.
            nonzero_init={r"model\.language_model\.layers\.\d+\.cross_attn_(attn|mlp)_gate": 1.0,
                          r"model\.vision_model\.(gated_positional_embedding|pre_tile_positional_embedding"
                          r"|post_tile_positional_embedding)\.gate": 1.0},
            processor={"image": {"image_mean": [0.48145466, 0.4578275, 0.40821073],
                                 "image_std": [0.26862954, 0.26130258, 0.27577711]}},
            notes="Llama 3.2 Vision: cross-attention layer 1 of 3, GQA 5:1, 28px tiles (max 2), "
                  "Llama-3 tokenizer with <|image|>, untied",
        ),
    ]
}


# Models whose matrices have rows that are multiples of 256, so that every GGUF quantisation type
# (K-quants work on 256-value blocks) applies as it does on real checkpoints; the odd sizes of
# ZOO make llama.cpp fall back to other types for almost every tensor. A larger initializer range
# than real models' keeps next-token logits of these random models apart, so that comparisons of
# llama.cpp's predictions with transformers' are not decided by near-ties.
_ALIGNED = {"num_hidden_layers": 3, "max_position_embeddings": 2048, "initializer_range": 0.08,
            "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "head_dim": 64,
            "rms_norm_eps": 1e-5}

ALIGNED_ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in [
        ZooSpec(name="llama_k", config_class="LlamaConfig", tokenizer="llama3",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 1, "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 256}},
                notes="Llama 3.1-style rope scaling, GQA 4:1, untied"),
        ZooSpec(name="mistral_k", config_class="MistralConfig", tokenizer="spm",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "tie_word_embeddings": False,
                        "sliding_window": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
                notes="SentencePiece-style tokenizer"),
        ZooSpec(name="qwen2_k", config_class="Qwen2Config", tokenizer="qwen2",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
                notes="tied embeddings, qkv bias"),
        ZooSpec(name="qwen3_k", config_class="Qwen3Config", tokenizer="qwen2",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
                notes="q/k RMSNorm"),
        ZooSpec(name="gemma2_k", config_class="Gemma2Config", tokenizer="gemma3",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "query_pre_attn_scalar": 64,
                        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 16,
                        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
                notes="Gemma 2: soft-capping, a window of 16 on layers 0 and 2, tied"),
        ZooSpec(name="gemma3_k", config_class="Gemma3TextConfig", tokenizer="gemma3",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "query_pre_attn_scalar": 64,
                        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 16,
                        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
                notes="Gemma 3 text: q/k norms, a window of 16 on layers 0 and 2 with their own RoPE base, tied"),
        ZooSpec(name="phi3_k", config_class="Phi3Config", tokenizer="phi4",
                config={**_ALIGNED, "vocab_size": 1024, "num_key_value_heads": 2, "sliding_window": None,
                        "tie_word_embeddings": True, "original_max_position_embeddings": 512,  # Phi3Config's own
                        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.75, "original_max_position_embeddings": 512,
                                            "short_factor": [1.0 + 0.02 * i for i in range(24)],
                                            "long_factor": [1.0 + 0.25 * i for i in range(24)]}},
                notes="Phi-4-mini's shape: packed projections, partial rotary (48 of 64), LongRoPE from 512 "
                      "to 2048 positions, tied, Phi-4 tokenizer"),
    ]
}

def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "unsloth_like" / "zoo"


def get_spec(name: str) -> ZooSpec:
    spec = ZOO.get(name) or ALIGNED_ZOO.get(name)
    if spec is None:
        raise ValueError(f"Unknown zoo model {name!r}; choose one of: {', '.join([*ZOO, *ALIGNED_ZOO])}.")
    return spec


def zoo_model_dir(name: str | ZooSpec, cache_dir: str | Path | None = None) -> Path:
    """Directory holding zoo model ``name`` (config, safetensors, tokenizer); built on first use.
    ``name`` may also be a ``ZooSpec`` (e.g. a zoo entry with a setting changed by
    ``dataclasses.replace``), cached under its own key in the same way."""
    spec = name if isinstance(name, ZooSpec) else get_spec(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_cached(root / spec.cache_key(), lambda staging: build_model_dir(spec, staging))


def build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, a model folder (with ``config.json``) that ``build`` writes on first use into a
    private folder next to it, renamed into place when done: concurrent builders never see half a
    folder, and one that loses the race keeps the winner's."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_model_dir(spec: ZooSpec, directory: Path) -> None:
    """Write tokenizer, seeded model and, for a VLM, its processor for ``spec`` into ``directory``
    (no caching)."""
    import transformers

    max_len = _text_config_dict(spec)["max_position_embeddings"]
    save_tokenizer(spec.tokenizer_spec, directory, model_max_length=max_len)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)

    config_kwargs = copy.deepcopy(spec.config)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    _text_config_dict(spec, config_kwargs).update(special_ids)
    for field_name, token in spec.token_fields.items():
        config_kwargs[field_name] = tokenizer.convert_tokens_to_ids(token)
    config = getattr(transformers, spec.config_class)(**config_kwargs)

    auto = transformers.AutoModelForImageTextToText if spec.is_vlm else transformers.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(spec.seed)
        model = auto.from_config(config, dtype=torch.float32)
        _fill_zero_initialised(model, spec.nonzero_init)
    model.generation_config = _generation_config(spec, tokenizer)
    model.save_pretrained(directory)
    if spec.is_vlm:
        from .processors import save_processor

        save_processor(spec, directory)


def _fill_zero_initialised(model, patterns: dict[str, float]) -> None:
    """Seeded normal values for the parameters matching ``patterns`` (see ``ZooSpec.nonzero_init``)."""
    if not patterns:
        return
    compiled = {re.compile(pattern): std for pattern, std in patterns.items()}
    matched = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            for pattern, std in compiled.items():
                if pattern.fullmatch(name):
                    param.normal_(0.0, std)
                    matched.add(pattern.pattern)
                    break
    if missing := set(patterns) - matched:
        raise ValueError(f"nonzero_init patterns match no parameter: {sorted(missing)}")


def _text_config_dict(spec: ZooSpec, config: dict | None = None) -> dict:
    config = spec.config if config is None else config
    return config["text_config"] if spec.is_vlm else config


def _generation_config(spec: ZooSpec, tokenizer) -> "transformers.GenerationConfig":
    from transformers import GenerationConfig

    eos_ids = [tokenizer.eos_token_id]
    end_of_turn = {"llama3": "<|eot_id|>", "llama3_demo": "<|eot_id|>", "llama3_vision": "<|eot_id|>", "gemma3": "<end_of_turn>"}
    if spec.tokenizer in end_of_turn:  # Llama-3.1+ and Gemma 3 stop on end-of-turn as well as EOS
        eos_ids.append(tokenizer.convert_tokens_to_ids(end_of_turn[spec.tokenizer]))
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def load_zoo_model(
    name: str | ZooSpec,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    cache_dir: str | Path | None = None,
):
    """``(model, tokenizer)`` for zoo model ``name`` loaded with plain transformers.

    ``load_in_4bit`` quantises the linear layers to bitsandbytes NF4 with double quantisation
    (this works on CPU with bitsandbytes >= 0.50); ``lm_head`` stays in full precision and a VLM
    keeps what ``FastVisionModel`` keeps (``models.vision.keep_unquantized_modules``: its
    projectors; Gemma 3 its whole vision tower) unquantised, as Unsloth does. For a VLM the second value is still the tokenizer; its
    processor is ``AutoProcessor.from_pretrained(zoo_model_dir(name))``. ``name`` may also be a
    ``ZooSpec`` (as for ``zoo_model_dir``). Note that on CPU a 4-bit
    model must not run in eval mode before training: bitsandbytes repacks CPU weights on the first
    no-grad forward, after which training breaks.
    """
    import transformers

    spec = name if isinstance(name, ZooSpec) else get_spec(name)
    directory = zoo_model_dir(spec, cache_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        skip = ["lm_head"]
        if spec.is_vlm:
            from ..models.vision import keep_unquantized_modules

            skip = keep_unquantized_modules(transformers.AutoConfig.from_pretrained(directory))
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    auto = transformers.AutoModelForImageTextToText if spec.is_vlm else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(directory, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def make_vlm_inputs(tokenizer, config, grid_thw: tuple[int, int, int] = (1, 4, 6), text: str = "Describe the picture.",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-image chat batch for a zoo Qwen-family VLM (``qwen2_vl``, ``qwen2_5_vl``,
    ``qwen3_vl``): token ids with the right number of image pads, random ``pixel_values`` already
    flattened into patches, and ``image_grid_thw``.

    Built without an image processor (for any grid, and without torchvision), using the same patch
    layout the processor produces: one row per ``temporal x patch x patch`` patch, ``grid_h x grid_w``
    patches merged ``spatial_merge_size**2`` at a time into one LLM token. Batches of real images
    through the saved processor, for every zoo VLM: ``testing.processors.vlm_chat_batch``.
    """
    vision = config.vision_config
    t, h, w = grid_thw
    if h % vision.spatial_merge_size or w % vision.spatial_merge_size:
        raise ValueError(f"grid height/width must be multiples of spatial_merge_size={vision.spatial_merge_size}.")
    n_image_tokens = t * h * w // vision.spatial_merge_size**2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)
    encoded = tokenizer([prompt], return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(t * h * w, patch_dim, generator=generator)
    # Modality of each token (0 text, 1 image), which the processor also returns: M-RoPE needs it.
    mm_token_type_ids = (encoded["input_ids"] == config.image_token_id).long()
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([grid_thw]),
    }
