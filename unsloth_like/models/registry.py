"""Which architectures we patch, and how: ``config.model_type`` -> ``PatchSpec``.

A new architecture that shares the Llama shape (pre-norm decoder, RMSNorm, q/k/v/o attention
with rotary embeddings, gated MLP) is one ``register`` call naming its module classes. Anything
not registered loads unpatched through ``FastModel`` and trains with upstream code.

A vision-language family is one ``register_vision`` call: the ``PatchSpec`` of its language
decoder (which gets our kernels, as a text model does) plus what the vision path needs to know
about it (``VisionSpec``). Its vision tower keeps upstream code except its norms (``nn.LayerNorm``,
or the decoder's RMSNorm class where it shares it), whose kernels are exact replacements.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PatchSpec:
    """How to patch one architecture.

    ``norm``/``attention``/``mlp`` are the class names of its modules. ``sliding_window`` says
    where the attention gets its window from, mirroring upstream: ``"none"`` (Llama),
    ``"config"`` (Mistral: ``config.sliding_window``) or ``"module"`` (Qwen2/3: the layer's own
    ``sliding_window`` attribute). ``qk_norm``: RMSNorm on q and k per head before RoPE (Qwen3,
    Gemma 3). ``norm_offset``: 1.0 for Gemma's ``(1 + weight)`` norms (computed in fp32, one cast
    at the end), 0.0 for Llama's. ``softcap_logits``: whether the model's own head applies
    ``final_logit_softcapping`` when the config sets it (Gemma 2/3 text models do; transformers'
    multimodal heads never do), which the fused loss must then do too. ``softcap_attention``: the
    upstream attention hands ``attn_logit_softcapping`` to its attention function (Gemma 2), which
    only the eager implementation (and flash/flex) can apply. ``packed_projections``: q/k/v live in
    one ``qkv_proj`` and gate/up in one ``gate_up_proj`` (Phi-3/Phi-4; ``models.phi3``).
    """

    model_type: str
    norm: str
    attention: str
    mlp: str
    sliding_window: str = "none"
    qk_norm: bool = False
    norm_offset: float = 0.0
    softcap_logits: bool = True
    softcap_attention: bool = False
    packed_projections: bool = False

    @property
    def kernels(self) -> tuple[str, ...]:
        return ("rms_norm", "apply_rope", "swiglu", "fused_linear_cross_entropy")


_REGISTRY: dict[str, PatchSpec] = {}


def register(spec: PatchSpec) -> PatchSpec:
    if spec.sliding_window not in ("none", "config", "module"):
        raise ValueError(f"sliding_window must be 'none', 'config' or 'module', got {spec.sliding_window!r}.")
    _REGISTRY[spec.model_type] = spec
    return spec


def spec_for(model_type: str) -> PatchSpec | None:
    return _REGISTRY.get(model_type)


@dataclass(frozen=True)
class VisionSpec:
    """A vision-language family (the ``model_type`` of its top-level config): ``text`` patches its
    language decoder. Which modules stay 16-bit in a quantised load is found on the model itself
    (``models.vision.keep_unquantized_modules``), for any family.

    GGUF export: ``mmproj`` is llama.cpp's ``clip.projector_type`` for the family's vision tower
    and projector (how its tensors are converted lives in ``save.gguf.mmproj``, keyed by it; the
    language model's llama.cpp architecture follows from its text config in
    ``save.gguf.architectures``). A family llama.cpp cannot run has ``mmproj=None`` and
    ``no_gguf`` says why, in a sentence shown to the user."""

    text: PatchSpec
    mmproj: str | None = None
    no_gguf: str = ""

    @property
    def model_type(self) -> str:
        return self.text.model_type


_VISION: dict[str, VisionSpec] = {}


def register_vision(spec: VisionSpec) -> VisionSpec:
    register(spec.text)
    _VISION[spec.model_type] = spec
    return spec


def vision_spec_for(model_type: str) -> VisionSpec | None:
    return _VISION.get(model_type)


def supported_vision_model_types() -> list[str]:
    return sorted(_VISION)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


register(PatchSpec("llama", "LlamaRMSNorm", "LlamaAttention", "LlamaMLP"))
register(PatchSpec("mistral", "MistralRMSNorm", "MistralAttention", "MistralMLP", sliding_window="config"))
register(PatchSpec("qwen2", "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP", sliding_window="module"))
register(PatchSpec("qwen3", "Qwen3RMSNorm", "Qwen3Attention", "Qwen3MLP", sliding_window="module", qk_norm=True))
register(PatchSpec("phi3", "Phi3RMSNorm", "Phi3Attention", "Phi3MLP", sliding_window="config",
                   packed_projections=True))
register(PatchSpec("gemma2", "Gemma2RMSNorm", "Gemma2Attention", "Gemma2MLP", sliding_window="module",
                   norm_offset=1.0, softcap_attention=True))
register(PatchSpec("gemma3_text", "Gemma3RMSNorm", "Gemma3Attention", "Gemma3MLP", sliding_window="module",
                   qk_norm=True, norm_offset=1.0))

register_vision(VisionSpec(PatchSpec("qwen2_vl", "Qwen2VLRMSNorm", "Qwen2VLAttention", "Qwen2MLP",
                                     sliding_window="module", softcap_logits=False), mmproj="qwen2vl_merger"))
register_vision(VisionSpec(PatchSpec("qwen2_5_vl", "Qwen2_5_VLRMSNorm", "Qwen2_5_VLAttention", "Qwen2MLP",
                                     sliding_window="module", softcap_logits=False), mmproj="qwen2.5vl_merger"))
register_vision(VisionSpec(PatchSpec("qwen3_vl", "Qwen3VLTextRMSNorm", "Qwen3VLTextAttention", "Qwen3VLTextMLP",
                                     qk_norm=True, softcap_logits=False), mmproj="qwen3vl_merger"))
register_vision(VisionSpec(PatchSpec("gemma3", "Gemma3RMSNorm", "Gemma3Attention", "Gemma3MLP", sliding_window="module",
                                     qk_norm=True, norm_offset=1.0, softcap_logits=False), mmproj="gemma3"))
register_vision(VisionSpec(PatchSpec("mllama", "MllamaTextRMSNorm", "MllamaTextSelfAttention", "MllamaTextMLP",
                                     softcap_logits=False),
                           no_gguf="llama.cpp has no converter or architecture for MllamaForConditionalGeneration "
                                   "(Llama 3.2 Vision), so it cannot be exported to GGUF; save it with "
                                   "save_pretrained_merged instead (transformers and vLLM load that directory)."))
