"""One tensor -> the bytes of one GGUF tensor of a given GGML type.

* F32 / F16 / BF16: a cast (BF16 rounds to nearest even, like llama.cpp's converter);
* Q2_K ... Q6_K on a GPU: our torch implementation (``kquants.py``) of llama.cpp's reference
  quantisers, where the tensor is;
* every quantised type on a CPU: our C quantisers (``quants.c``, built on first use by
  ``native.py``), on all CPU threads; where they cannot be built (no C compiler), the torch
  K-quants and the ``gguf`` package's numpy quantisers (legacy types), 3-5x slower.

Every path writes the bytes llama.cpp writes (the tests compare them with each other and with
llama.cpp). Everything is quantised from float32, as llama.cpp does, whatever the checkpoint's dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from . import native
from .kquants import K_QUANT_TYPES, quantize_k

_NUMPY_QUANTISED = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
_ROWS_PER_CHUNK_BYTES = 64 << 20  # numpy quantisers make several float32 temporaries per value


def tensor_bytes(tensor: torch.Tensor, qtype: T) -> np.ndarray:
    """``tensor`` (any float dtype, any device) as the array ``GGUFWriter.write_tensor_data``
    takes for ``qtype``: float32/float16 values, or uint8 bytes shaped (rows..., row bytes)."""
    if qtype == T.F32:
        return _numpy(tensor.float())
    if qtype == T.F16:
        return _numpy(tensor.to(torch.float16))
    if qtype == T.BF16:
        return _numpy(tensor.to(torch.bfloat16).view(torch.uint8))
    on_gpu_kernel = qtype.name in K_QUANT_TYPES and tensor.device.type != "cpu"  # the GPU is faster there
    if qtype in native.TYPES and not on_gpu_kernel and native.available():
        return native.quantize(tensor, qtype)
    if qtype.name in K_QUANT_TYPES:
        rows = tensor.reshape(-1, tensor.shape[-1])
        return _numpy(quantize_k(rows, qtype.name)).reshape(*tensor.shape[:-1], -1)
    if qtype in _NUMPY_QUANTISED:
        return _numpy_quantise(tensor, qtype)
    raise ValueError(f"Writing GGML type {qtype.name} is not supported.")


def _numpy_quantise(tensor: torch.Tensor, qtype: T) -> np.ndarray:
    """The gguf package's quantiser, a bounded number of rows at a time (it is not in place)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, _ROWS_PER_CHUNK_BYTES // (4 * rows.shape[1]))
    pieces = [quants.quantize(_numpy(rows[i:i + step].float()), qtype) for i in range(0, rows.shape[0], step)]
    return np.concatenate(pieces).reshape(*tensor.shape[:-1], -1)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().cpu().numpy()
