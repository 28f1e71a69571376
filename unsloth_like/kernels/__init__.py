"""Pure compute: Triton kernels, their torch references and autograd Functions.

Nothing here imports transformers, peft or the rest of unsloth_like. Each op family lives in its
own module (Triton kernels + ``<op>_reference`` + autograd Function + public dispatcher) and
registers itself with ``_backend.register_op`` so ``doctor`` can report it; the backend
(compiled Triton, Triton interpreter, torch reference) is chosen in ``_backend`` alone.

Every op module is imported here, eagerly, and its public names are bound on this package
*after* the module import, so ``unsloth_like.kernels.rms_norm`` is the function even though a
submodule has the same name. Set ``TRITON_INTERPRET`` before importing this package.
"""

from __future__ import annotations

import importlib

from ._backend import Backend, op_backends, registered_ops, select_backend, use_backend

# public name -> module (relative to this package) that defines it (imported eagerly below)
_PUBLIC = {
    "rms_norm": "rms_norm",
    "rms_norm_reference": "rms_norm",
    "cross_entropy": "cross_entropy",
    "cross_entropy_reference": "cross_entropy",
    "fused_linear_cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy_reference": "cross_entropy",
    "dequantize_nf4": "quant",
    "dequantize_nf4_reference": "quant",
    "nf4_code": "quant",
    "swiglu": "swiglu",
    "swiglu_reference": "swiglu",
    "geglu": "swiglu",
    "geglu_reference": "swiglu",
    "gated_activation_forward": "swiglu",
    "gated_activation_backward": "swiglu",
    "Projection": "lora",
    "lora_linear": "lora",
    "lora_qkv": "lora",
    "lora_mlp": "lora",
    "lora_projections": "lora",
    "lora_projections_reference": "lora",
    "lora_mlp_reference": "lora",
    "apply_rope": "rope",
    "apply_rope_reference": "rope",
    "layer_norm": "layer_norm",
    "layer_norm_reference": "layer_norm",
}
OP_MODULES = tuple(dict.fromkeys(_PUBLIC.values()))
for _name, _module in _PUBLIC.items():
    globals()[_name] = getattr(importlib.import_module(f".{_module}", __name__), _name)
del _name, _module

__all__ = ["Backend", "op_backends", "registered_ops", "select_backend", "use_backend", *_PUBLIC]
