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


# Gemma's MLPs are GeGLU: llama.cpp's CPU GELU is a table over float16 inputs with float16 outputs
# (ggml-cpu/vec.h, GGML_GELU_FP16), a relative rounding of 2^-11 on every activation, so logits
# carry up to that relative error on top of float32 rounding.
GELU_TABLE_ROUNDING = 2.0 ** -11


def f32_logit_bound(expected: np.ndarray, gelu_table: bool = False) -> float:
    """The largest |llama.cpp - transformers| logit difference an F32 GGUF may show: float32
    rounding (1e-4 for logits of size ~5 over a few layers), plus the GELU table's relative
    rounding of the largest logit for GeGLU models."""
    return 1e-4 + (GELU_TABLE_ROUNDING * float(np.abs(expected).max()) if gelu_table else 0.0)


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


# --- llama.cpp's multimodal library (libmtmd) with a projector file -------------------------------


@functools.cache
def _quiet_callback():
    """A no-op ggml log callback (cached: ctypes callbacks must outlive their registration)."""
    return _llama_cpp().llama_log_callback(lambda level, text, user_data: None)


@contextlib.contextmanager
def load_multimodal(text_path: str | Path, mmproj_path: str | Path, n_ctx: int = 512,
                    image_min_tokens: int = 0, image_max_tokens: int = 0):
    """``(Llama, mtmd context)`` for a text GGUF and its projector, on CPU with an F32 KV cache
    (as ``load``); ``image_min_tokens`` / ``image_max_tokens`` override the projector's limits
    on image tokens (0: its defaults). Freed on exit."""
    llama_cpp = _llama_cpp()
    from llama_cpp import mtmd_cpp

    model = llama_cpp.Llama(model_path=str(text_path), n_ctx=n_ctx, verbose=False, type_k=_GGML_TYPE_F32,
                            type_v=_GGML_TYPE_F32, n_threads=2, n_batch=n_ctx, n_ubatch=n_ctx)
    mtmd_cpp.mtmd_log_set(_quiet_callback(), None)  # libmtmd logs every image it encodes; failures still raise
    mtmd_cpp.mtmd_helper_log_set(_quiet_callback(), None)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    params.image_min_tokens, params.image_max_tokens = image_min_tokens, image_max_tokens
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), model.model, params)
    try:
        if ctx is None:
            raise RuntimeError(f"libmtmd could not load the projector {mmproj_path} for {text_path}.")
        yield model, ctx
    finally:
        if ctx is not None:
            mtmd_cpp.mtmd_free(ctx)
        model.close()


def _image_chunks(ctx, text: str, image):
    """libmtmd's chunks for ``text`` with its media marker (``<__media__>``) standing for the RGB
    PIL ``image``; the caller frees them with ``mtmd_input_chunks_free``."""
    from llama_cpp import mtmd_cpp

    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    buffer = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmap = mtmd_cpp.mtmd_bitmap_init(image.width, image.height, buffer)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    encoded = text.encode("utf-8")
    spec = mtmd_cpp.mtmd_input_text()
    spec.text, spec.text_len, spec.add_special, spec.parse_special = encoded, len(encoded), False, True
    try:
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        status = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(spec), bitmaps, 1)
        if status != 0:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed with status {status}.")
    finally:
        mtmd_cpp.mtmd_bitmap_free(bitmap)
    return chunks


def media_marker() -> str:
    from llama_cpp import mtmd_cpp

    return mtmd_cpp.mtmd_default_marker().decode("utf-8")


def multimodal_prompt(model, ctx, text: str, image) -> list[tuple[str, object]]:
    """How libmtmd lays out ``text`` (with ``media_marker()`` where the image goes): a list of
    ``("text", token ids)`` and ``("image", (n_tokens, grid_x, grid_y))`` chunks."""
    from llama_cpp import mtmd_cpp

    chunks = _image_chunks(ctx, text, image)
    try:
        layout = []
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                layout.append(("text", [tokens[j] for j in range(count.value)]))
            else:
                image_tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
                layout.append(("image", (mtmd_cpp.mtmd_image_tokens_get_n_tokens(image_tokens),
                                         mtmd_cpp.mtmd_image_tokens_get_nx(image_tokens),
                                         mtmd_cpp.mtmd_image_tokens_get_ny(image_tokens))))
        return layout
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)


def image_embeddings(model, ctx, image) -> np.ndarray:
    """``(n_image_tokens, width)`` float32: what the projector feeds the language model for
    ``image`` (Qwen3-VL: the main features followed by each deepstack level's)."""
    llama_cpp = _llama_cpp()
    from llama_cpp import mtmd_cpp

    chunks = _image_chunks(ctx, media_marker(), image)
    try:
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd_cpp.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed.")
            width = llama_cpp.llama_model_n_embd_inp(model.model)
            output = mtmd_cpp.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(output, shape=(n_tokens * width,)).reshape(n_tokens, width).copy()
        raise RuntimeError("libmtmd made no image chunk.")
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)


def multimodal_logits(model, ctx, text: str, image) -> np.ndarray:
    """The logits after evaluating ``text`` with ``image`` at its media marker (libmtmd's own
    evaluation: image embeddings, M-RoPE positions, non-causal image attention where the model
    has it)."""
    llama_cpp = _llama_cpp()
    from llama_cpp import mtmd_cpp

    chunks = _image_chunks(ctx, text, image)
    try:
        model.reset()
        model._ctx.kv_cache_clear()
        n_past = llama_cpp.llama_pos(0)
        status = mtmd_cpp.mtmd_helper_eval_chunks(ctx, model.ctx, chunks, 0, 0, model.n_batch, True,
                                                  ctypes.byref(n_past))
        if status != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks failed with status {status}.")
        logits = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(model.n_vocab(),)).copy()
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)


def generate_with_image(model, ctx, text: str, image, max_tokens: int = 4) -> list[int]:
    """Greedy tokens after ``text`` + ``image`` (evaluated as ``multimodal_logits`` does)."""
    llama_cpp = _llama_cpp()

    logits = multimodal_logits(model, ctx, text, image)
    tokens = []
    for _ in range(max_tokens):
        token = int(np.argmax(logits))
        tokens.append(token)
        batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1)
        if llama_cpp.llama_decode(model.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed.")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),)).copy()
    return tokens
