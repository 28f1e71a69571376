"""Which architectures we patch, and how: ``config.model_type`` -> ``PatchSpec``.

A new architecture that shares the Llama shape (pre-norm decoder, RMSNorm, q/k/v/o attention
with rotary embeddings, gated MLP) is one ``register`` call naming its module classes. Anything
not registered loads unpatched through ``FastModel`` and trains with upstream code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PatchSpec:
    """How to patch one architecture.

    ``norm``/``attention``/``mlp`` are the class names of its modules. ``sliding_window`` says
    where the attention gets its window from, mirroring upstream: ``"none"`` (Llama),
    ``"config"`` (Mistral: ``config.sliding_window``) or ``"module"`` (Qwen2/3: the layer's own
    ``sliding_window`` attribute). ``qk_norm``: RMSNorm on q and k per head before RoPE (Qwen3).
    """

    model_type: str
    norm: str
    attention: str
    mlp: str
    sliding_window: str = "none"
    qk_norm: bool = False

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


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


register(PatchSpec("llama", "LlamaRMSNorm", "LlamaAttention", "LlamaMLP"))
register(PatchSpec("mistral", "MistralRMSNorm", "MistralAttention", "MistralMLP", sliding_window="config"))
register(PatchSpec("qwen2", "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP", sliding_window="module"))
register(PatchSpec("qwen3", "Qwen3RMSNorm", "Qwen3Attention", "Qwen3MLP", sliding_window="module", qk_norm=True))
