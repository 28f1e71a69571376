"""Build the llama.cpp Jinja renderer the chat-template tests compare against.

    python scripts/build_llamacpp_jinja.py          # -> build/llamacpp-jinja/render

llama-server, and Ollama by default, render a GGUF's ``tokenizer.chat_template`` with llama.cpp's
own Jinja engine (``common/jinja``), not Python's Jinja2. This compiles that engine, from the
llama.cpp sources of the installed llama-cpp-python release (its source distribution, fetched
with ``pip download``), with ``tests/gguf_export/llamacpp_jinja/render.cpp`` as the entry point:
about 40 s on 2 cores, once; an up-to-date build is kept. ``make test`` runs it; without a C++
compiler or the sources, it says why and the tests that need the renderer are skipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "gguf_export" / "llamacpp_jinja" / "render.cpp"
OUT = ROOT / "build" / "llamacpp-jinja"
# What the engine needs from llama.cpp's tree; nothing of ggml or libllama.
_MEMBERS = ("common/jinja/", "common/unicode.h", "common/unicode.cpp", "common/json.h", "common/json.cpp",
            "vendor/nlohmann/")
# json.cpp includes ggml.h for GGML_ASSERT alone.
_GGML_SHIM = "#pragma once\n#include <cstdlib>\n#define GGML_ASSERT(x) do { if (!(x)) std::abort(); } while (0)\n"


def _fail(message: str) -> None:
    sys.exit(f"build_llamacpp_jinja: {message}")


def _stamp(version: str) -> str:
    return f"llama-cpp-python {version}; render.cpp {hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}"


def _fetch_sources(version: str, into: Path) -> Path:
    download = into / "sdist"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                           f"llama-cpp-python=={version}", "-d", str(download)], capture_output=True, text=True)
    archives = list(download.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        _fail(f"could not download the llama-cpp-python {version} sources: {done.stderr.strip()[-500:]}")
    tree = into / "llama.cpp"
    with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and member.isfile() and parts[1].startswith(_MEMBERS):
                target = tree / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if not (tree / "common" / "jinja").is_dir():
        _fail(f"the llama-cpp-python {version} sources hold no common/jinja engine (llama.cpp too old?).")
    return tree


def main() -> None:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        _fail("llama-cpp-python is not installed: pip install -e '.[gguf-check]'.")
    binary, stamp_file = OUT / "render", OUT / "STAMP"
    if binary.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp(version):
        print(f"{binary} is up to date ({_stamp(version)}).")
        return
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        _fail("no C++ compiler (c++ or g++, or CXX) found.")
    with tempfile.TemporaryDirectory(prefix="llamacpp-jinja-") as scratch:
        tree = _fetch_sources(version, Path(scratch))
        shim = Path(scratch) / "shim"
        shim.mkdir()
        (shim / "ggml.h").write_text(_GGML_SHIM)
        sources = [str(SOURCE), *map(str, sorted((tree / "common" / "jinja").glob("*.cpp"))),
                   str(tree / "common" / "unicode.cpp"), str(tree / "common" / "json.cpp")]
        OUT.mkdir(parents=True, exist_ok=True)
        partial = OUT / ".render.partial"
        done = subprocess.run([compiler, "-std=c++17", "-O1", f"-I{shim}", f"-I{tree / 'common'}", f"-I{tree / 'vendor'}",
                               *sources, "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            _fail(f"compiling the renderer failed:\n{done.stderr[-3000:]}")
        partial.replace(binary)
    stamp_file.write_text(_stamp(version))
    print(f"built {binary} ({_stamp(version)}).")


if __name__ == "__main__":
    main()
