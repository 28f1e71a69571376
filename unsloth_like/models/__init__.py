"""Integration with transformers and peft: loading, per-instance patching, the training forwards."""

from .patching import is_patched, patch_model, unpatch
from .registry import PatchSpec, register, supported_model_types

__all__ = ["PatchSpec", "is_patched", "patch_model", "register", "supported_model_types", "unpatch"]
