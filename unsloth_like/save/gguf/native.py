"""The C quantisers (``quants.c``): built once with the system's C compiler, run on CPU threads.

On a CPU, torch's one-operation-at-a-time K-quants (``kquants.py``) and the ``gguf`` package's
numpy code are 3-5x slower than llama.cpp's compiled quantiser, because every step of the scale
searches is a pass over memory. ``quants.c`` is the same maths as compiled loops; it is compiled on
first use (about a second) into the user's cache directory and loaded with ctypes, so the package
stays pure Python and installs anywhere. Rows are split over ``torch.get_num_threads()`` threads
(ctypes releases the GIL during the call).

Where no C compiler is found or the build fails, ``library()`` returns None and says why once;
the callers then use the torch/numpy quantisers, which write the same bytes, only slower.
The bytes are the same on every path: the tests compare them with each other and with llama.cpp.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quants.c")
TYPES = frozenset({T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})
# No contraction into fused multiply-adds and no fast-math: ggml's reference (x86-64, no FMA)
# rounds every operation on its own, and a last-bit difference can change a stored scale.
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
_FLOAT32_BYTES_IN_FLIGHT = 256 << 20  # float32 copies of the rows being quantised, all threads together
_BUILD_TIMEOUT_S = 120


def available() -> bool:
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The loaded quantiser library, built on first use; None (logged once, with the fix) when it
    cannot be built here."""
    return _build_and_load()[0]


def describe() -> str:
    """One line for ``doctor``: which quantisers a CPU export uses here, and why."""
    lib, reason = _build_and_load()
    return f"C (quants.c, built in {cache_directory()})" if lib else f"torch/numpy, 3-5x slower: {reason}"


@functools.cache
def _build_and_load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        return _load(build(cache_directory())), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("GGUF quantisation falls back to the torch/numpy quantisers (same bytes, 3-5x slower on a "
                       "CPU): %s", error)
        return None, str(error)


def cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unsloth_like" / "gguf-quants"


def find_compiler() -> str | None:
    """``$CC`` when set (as build tools honour it), else the first of cc, gcc, clang on PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def build(directory: Path, compiler: str | None = None) -> Path:
    """The compiled library in ``directory``, compiling it when no build of this source, these
    flags and this compiler exists yet. Concurrent builders each write a private file and rename
    it into place, so a reader never loads a half-written library."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler was found (cc, gcc or clang on PATH, or $CC); install one (e.g. "
                           "`apt install gcc`) to quantise at compiled speed")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(CFLAGS).encode(), compiler.encode(),
                                     platform.machine().encode(), sys.platform.encode()])).hexdigest()[:16]
    target = directory / f"quants-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".quants-{key}.{os.getpid()}.so"
    command = [compiler, *CFLAGS, "-o", str(partial), str(SOURCE), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Built the GGUF quantisers: %s", target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ul_quantize_rows.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.ul_quantize_rows.restype = ctypes.c_int
    lib.ul_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ul_row_bytes.restype = ctypes.c_int64
    return lib


def quantize(tensor: torch.Tensor, qtype: T, lib: ctypes.CDLL | None = None) -> np.ndarray:
    """``tensor`` (any float dtype, any device, row length a whole number of ``qtype`` blocks)
    as uint8 (rows..., row bytes): each row the blocks llama.cpp writes. Converted to float32 a
    bounded number of rows at a time, on all of torch's CPU threads."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the C quantisers are not available here (see the warning logged above)")
    if qtype not in TYPES:
        raise ValueError(f"The C quantisers do not write GGML type {qtype.name}.")
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.ndim else tensor.reshape(1, 1)
    n_rows, n_per_row = rows.shape
    row_bytes = lib.ul_row_bytes(int(qtype), n_per_row)
    if row_bytes <= 0:
        raise ValueError(f"{qtype.name} packs rows in whole blocks, but the row length {n_per_row} is not a "
                         f"multiple of its block size.")
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    threads = max(1, torch.get_num_threads())
    # Each thread converts its own rows to float32 and quantises them, so the conversion runs in
    # parallel too; the pieces in flight hold at most _FLOAT32_BYTES_IN_FLIGHT (one row at least).
    step = max(1, min(-(-n_rows // threads), _FLOAT32_BYTES_IN_FLIGHT // (threads * 4 * n_per_row)))
    type_id = int(qtype)

    def run(start: int) -> None:
        piece = rows[start:start + step].detach().to("cpu", torch.float32).contiguous().numpy()
        status = lib.ul_quantize_rows(type_id, piece.ctypes.data, out[start:].ctypes.data, len(piece), n_per_row)
        if status != 0:
            raise RuntimeError(f"the C quantiser rejected {qtype.name} with rows of {n_per_row}")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(run, start) for start in range(0, n_rows, step)]:
            future.result()
    return out.reshape(*tensor.shape[:-1], row_bytes)
