"""llama.cpp as the reference for our GGUF output (llama-cpp-python, the ``gguf-check`` extra).

Two levels:

* ``ggml_quantize``: ggml's quantiser on one array (ctypes, described below);
* ``load`` / ``tokenize`` / ``logits`` / ``perplexity``: llama.cpp running a GGUF file, and
  ``quantize_file``: llama.cpp's ``llama_model_quantize`` (the function behind the
  ``llama-quantize`` tool) on a whole file. Logits use an F32 KV cache: llama.cpp's default F16
  cache alone moves logits by about 1e-2, which would hide what a comparison is about (the
  weights in the file).

On ``ggml_quantize``:
The ``llama_cpp`` package (llama-cpp-python, the ``gguf-check`` extra) ships the ggml libraries
it was built with; ``ggml_quantize_chunk`` lives in ``libggml-base``. We load that library
directly from the package folder (found without importing ``llama_cpp``, which would also load
``libllama`` and its logging) and ask it to quantise float32 rows, with no importance matrix:
exactly what ``llama-quantize`` does by default.

ggml's type numbers are taken from ``gguf.GGMLQuantizationType`` and, before first use, checked
against the library's own ``ggml_type_name`` so that a renumbering cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

INSTALL_HINT = "pip install 'unsloth-like[gguf-check]'"
_GGML_TYPE_F32 = 0


def available() -> bool:
    """Whether llama-cpp-python and its ggml library can be loaded."""
    try:
        _library()
    except ImportError:
        return False
    return True


def ggml_quantize(array: np.ndarray, type_name: str) -> bytes:
    """Quantise a 2-D float32 array (rows, n_per_row) with llama.cpp; returns the row-major bytes
    of the quantised tensor (``rows * ggml_row_size(type, n_per_row)`` of them)."""
    lib = _library()
    qtype = _ggml_type(type_name)
    src = np.ascontiguousarray(array, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"ggml_quantize takes a 2-D (rows, n_per_row) array, got shape {src.shape}")
    rows, n_per_row = src.shape
    block_size, _ = _block_geometry(type_name)
    if n_per_row % block_size:
        raise ValueError(f"{type_name} needs rows that are a multiple of {block_size} values, got {n_per_row}")
    row_size = lib.ggml_row_size(qtype, n_per_row)
    dst = ctypes.create_string_buffer(rows * row_size)
    lib.ggml_quantize_init(qtype)
    written = lib.ggml_quantize_chunk(qtype, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), dst,
                                      0, rows, n_per_row, None)
    if written != rows * row_size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * row_size}")
    return dst.raw


def _block_geometry(type_name: str) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_gguf_type(type_name)]


def _gguf_type(type_name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {type_name!r}") from None


@functools.cache
def _ggml_type(type_name: str) -> int:
    """The ggml_type number of ``type_name``, checked against the library's name for it."""
    value = int(_gguf_type(type_name).value)
    lib_name = _library().ggml_type_name(value)
    lib_name = lib_name.decode() if lib_name else None
    if lib_name is None or lib_name.lower() != type_name.lower():
        raise RuntimeError(
            f"gguf says {type_name} is ggml type {value}, but this llama.cpp calls type {value} "
            f"{lib_name!r}: the gguf and llama-cpp-python versions disagree")
    return value


@functools.cache
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"llama-cpp-python is not installed; it is needed to compare with llama.cpp: {INSTALL_HINT}")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = [lib_dir / name for name in _library_names()]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise ImportError(f"llama-cpp-python is installed but has no ggml-base library in {lib_dir}; "
                          f"reinstall it: {INSTALL_HINT}")
    try:
        return _declare(ctypes.CDLL(str(path)))
    except OSError as exc:
        raise ImportError(f"cannot load {path} ({exc}); reinstall llama-cpp-python: {INSTALL_HINT}") from exc


def _library_names() -> list[str]:
    if sys.platform == "win32":
        return ["ggml-base.dll", "libggml-base.dll"]
    if sys.platform == "darwin":
        return ["libggml-base.dylib", "libggml-base.so"]
    return ["libggml-base.so"]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """C signatures (ggml.h): without them ctypes would pass the int64 arguments as C ints."""
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.POINTER(ctypes.c_float)]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


# --- llama.cpp running a file ---------------------------------------------------------------------


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(f"Checking GGUF files with llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from error
    return llama_cpp


@contextlib.contextmanager
def load(path: str | Path, n_ctx: int = 512):
    """A ``llama_cpp.Llama`` for ``path`` with all logits kept and an F32 KV cache; closed on exit."""
    llama_cpp = _llama_cpp()
    model = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                            type_k=_GGML_TYPE_F32, type_v=_GGML_TYPE_F32, n_threads=2, n_batch=n_ctx)
    try:
        yield model
    finally:
        model.close()


def tokenize(model, text: str, add_bos: bool) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def logits(model, token_ids: list[int]) -> np.ndarray:
    """``(len(token_ids), vocab)`` float32 logits, one row per position."""
    model.reset()
    model.eval(list(token_ids))
    return np.array(model.scores[:len(token_ids)], dtype=np.float32)


def perplexity(model, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``token_ids[1:]`` given their prefixes."""
    scores = logits(model, token_ids)[:-1].astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(token_ids) - 1), token_ids[1:]].mean()
    return math.exp(nll)


def quantize_file(source: str | Path, target: str | Path, ftype: int, threads: int = 1) -> None:
    """llama.cpp's ``llama_model_quantize(source -> target)`` to file type ``ftype``
    (``gguf.LlamaFileType``), without an importance matrix, as ``llama-quantize`` does by default."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {target}, ftype {ftype}) failed with status {status}.")
