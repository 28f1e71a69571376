"""Integration with transformers and peft: loading, per-instance patching, the training forwards."""

from .nf4_cpu_guard import guard_4bit_layers, unguard_4bit_layers
from .patching import is_patched, patch_model, unpatch
from .registry import PatchSpec, register, supported_model_types

__all__ = ["PatchSpec", "guard_4bit_layers", "is_patched", "patch_model", "register", "supported_model_types",
           "unguard_4bit_layers", "unpatch"]
