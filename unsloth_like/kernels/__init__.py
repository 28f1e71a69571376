"""Pure compute: Triton kernels, their torch references and autograd Functions.

Nothing here imports transformers, peft or the rest of unsloth_like. Each op family lives in its
own module (Triton kernels + ``<op>_reference`` + autograd Function + public dispatcher) and
registers itself with ``_backend.register_op`` so ``doctor`` can report it; the backend
(compiled Triton, Triton interpreter, torch reference) is chosen in ``_backend`` alone.

Op modules import Triton, so they are loaded on first use of their public names (PEP 562
``__getattr__``): ``import unsloth_like`` stays light and the interpreter switch
(``TRITON_INTERPRET``) can still be set before Triton is imported.
"""

from __future__ import annotations

import importlib

from ._backend import Backend, op_backends, registered_ops, select_backend, use_backend

# public name -> module (relative to this package) that defines it
_LAZY = {
    "rms_norm": "rms_norm",
    "rms_norm_reference": "rms_norm",
}
OP_MODULES = tuple(dict.fromkeys(_LAZY.values()))

__all__ = ["Backend", "load_all_ops", "op_backends", "registered_ops", "select_backend", "use_backend", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def load_all_ops() -> None:
    """Import every op module (so each is registered); ``doctor`` calls this."""
    for module in OP_MODULES:
        importlib.import_module(f".{module}", __name__)
