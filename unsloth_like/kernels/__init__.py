"""Pure compute: Triton kernels, their torch references and autograd Functions.

Nothing here imports transformers, peft or the rest of unsloth_like. Each op family lives in its
own module and registers itself with ``_backend.register_op`` so ``doctor`` can report it; the
backend (compiled Triton, Triton interpreter, torch reference) is chosen in ``_backend`` alone.
"""

from ._backend import Backend, op_backends, registered_ops, select_backend, use_backend

__all__ = ["Backend", "op_backends", "registered_ops", "select_backend", "use_backend"]
