"""Quantisation methods (``quantization_method=``) and the tensor type each tensor gets.

A method names a *file type*, as llama.cpp's ``llama-quantize`` does: ``q4_k_m`` is not "every
tensor in Q4_K" but a mix (Q6_K for the output tensor and for some attn_v / ffn_down layers,
Q4_K elsewhere), chosen per tensor by its role, its layer and its row length. ``tensor_type``
reproduces the choices llama.cpp makes for the dense architectures we export, so a file we
write has the same types tensor by tensor as ``llama-quantize`` gives for the same model (a test
compares the two); the importance-matrix-only (IQ) and MoE branches do not apply here.

Rules every method shares (llama.cpp's): only 2-D weights are quantised; norms, biases and
``rope_freqs`` stay F32; a tensor whose row length is not a multiple of its type's block size
falls back to a compatible type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, and
F16 when even that does not fit).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

# name -> (llama.cpp file type, default tensor type)
METHODS: dict[str, tuple[F, T]] = {
    "f32": (F.ALL_F32, T.F32),
    "f16": (F.MOSTLY_F16, T.F16),
    "bf16": (F.MOSTLY_BF16, T.BF16),
    "q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "q2_k": (F.MOSTLY_Q2_K, T.Q2_K),
    "q3_k_s": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "q3_k_m": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "q3_k_l": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "q4_k_s": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "q4_k_m": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "q5_k_s": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "q5_k_m": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "q6_k": (F.MOSTLY_Q6_K, T.Q6_K),
}

# Unsloth's names for the same files (its docs: "not_quantized" is f16, "fast_quantized" q8_0,
# "quantized" q4_k_m; "q3_k"/"q4_k"/"q5_k" are the _m variants, as in llama.cpp's own aliases).
ALIASES = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "fp16": "f16",
    "float16": "f16",
    "bfloat16": "bf16",
    "fp32": "f32",
    "float32": "f32",
}

# Where rows are too short for the type's blocks (llama.cpp's tensor_type_fallback).
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_UNQUANTISED = {T.F32, T.F16, T.BF16}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def resolve_methods(quantization_method) -> list[str]:
    """Canonical method names for a name or a list of names (duplicates dropped, order kept)."""
    names = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method or [])
    if not names:
        raise ValueError(f"quantization_method is empty; pass one of {', '.join(valid_names())}, or a list of them.")
    return list(dict.fromkeys(resolve_method(name) for name in names))


def resolve_method(name) -> str:
    """``"Q4_K_M"`` / ``"quantized"`` / ``"q4_k_m"`` -> ``"q4_k_m"``; an unknown name is an error
    that lists the valid names and the closest one."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in METHODS:
        return key
    close = difflib.get_close_matches(key, valid_names(), n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown quantization_method {name!r}.{hint} Valid methods: {', '.join(valid_names())}.")


def valid_names() -> list[str]:
    return list(METHODS) + list(ALIASES)


@dataclass(frozen=True)
class ModelShape:
    """What the type choice needs to know about the model."""

    n_layer: int
    n_gqa: int  # query heads per key/value head
    tied_embeddings: bool  # no output.weight: token_embd doubles as the output matrix
    is_70b: bool = False  # llama.cpp gives 70B-class models' attn_v more bits


class TypeChooser:
    """``choose(gguf_name, shape)`` for the tensors of one file, in file order (llama.cpp counts
    attn_v tensors as it meets them, so the choice depends on the order, which is block order)."""

    def __init__(self, method: str, model: ModelShape):
        self.method = method
        self.ftype, self.default = METHODS[method]
        self.model = model
        self.i_attn_v = 0

    def choose(self, name: str, shape: tuple[int, ...]) -> T:
        """The GGML type of tensor ``name`` with torch ``shape`` (rows, row length)."""
        if not _quantisable(name, shape):
            return T.F32
        if self.default in _UNQUANTISED:
            return self.default
        chosen = self._mix(name, shape[-1])
        return _fit(chosen, shape[-1])

    def _mix(self, name: str, row: int) -> T:
        f, model = self.ftype, self.model
        new = self.default
        if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
            # the output matrix keeps more bits; llama.cpp uses Q8_0 when rows do not fit K blocks
            if row % GGML_QUANT_SIZES[new][0] != 0:
                return T.Q8_0
            return new if new == T.Q8_0 else T.Q6_K
        if name == "token_embd.weight":
            return new
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):  # llama.cpp mixes a packed qkv as attn_v
            return self._attn_v(new)
        layer = int(_LAYER.match(name).group(1)) if _LAYER.match(name) else 0
        n = model.n_layer
        if name.endswith("ffn_down.weight"):
            if f == F.MOSTLY_Q2_K:
                return T.Q3_K
            if f == F.MOSTLY_Q3_K_M:
                return T.Q5_K if layer < n // 16 else T.Q4_K
            if f == F.MOSTLY_Q3_K_L:
                return T.Q5_K
            if f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _more_bits(layer, n):
                return T.Q6_K
            if f == F.MOSTLY_Q4_K_S and layer < n // 8:
                return T.Q5_K
            return new
        if name.endswith("attn_output.weight"):
            return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(f, new)
        return new

    def _attn_v(self, new: T) -> T:
        f, model, i = self.ftype, self.model, self.i_attn_v
        self.i_attn_v += 1
        if f == F.MOSTLY_Q2_K:
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif f == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif f == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _more_bits(i, model.n_layer):
            new = T.Q6_K
        elif f == F.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        return new


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth and every third between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _quantisable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith(".weight") and "_norm.weight" not in name


def _fit(qtype: T, row: int) -> T:
    """``qtype``, or the type llama.cpp falls back to when ``row`` is not a multiple of its block."""
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = _FALLBACK.get(qtype, qtype)
    return fallback if row % GGML_QUANT_SIZES[fallback][0] == 0 else T.F16
