"""Every Triton kernel compiles for T4, A100, H100/H200, B200 and RTX 50 at the launches our ops make.

The interpreter tests prove what the kernels compute; this proves the compiler accepts them, and
that ptxas fits them in registers, without a GPU (``unsloth_like.testing.triton_compile``). It
runs in a subprocess because the kernels in this process were built for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unsloth_like.kernels._backend import interpreter_enabled
from unsloth_like.testing import triton_compile

pytest.importorskip("triton")
_PTXAS = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not _PTXAS.exists(), reason="this Triton wheel ships no ptxas (not an x86-64 CUDA build)")

# Register-pressure spills show up as hundreds of bytes a thread (rows of 16K+ columns held in one
# block). Below that, ptxas may still keep a word or two on the stack in a kernel far from the
# register limit (layer_norm forward on sm_80: 4 bytes stored at 40 registers); that is not a
# performance concern, so up to 16 bytes (stores + loads) pass.
_SPILL_TOLERANCE_BYTES = 16


def _compile_report(arch: int, directory: Path, zoo_cache: Path) -> dict:
    out = directory / f"sm{arch}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "unsloth_like.testing.triton_compile", "--arch", str(arch),
         "--json", str(out), "--zoo-cache", str(zoo_cache)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert out.exists(), f"the compile check crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    report["returncode"], report["stderr"] = proc.returncode, proc.stderr
    return report


@pytest.mark.slow
@pytest.mark.parametrize("arch", triton_compile.DEFAULT_ARCHES)
def test_every_kernel_compiles_without_spills_for(arch, tmp_path, zoo_cache):
    report = _compile_report(arch, tmp_path, zoo_cache)
    records = report["records"]

    failures = [f"{r['kernel']} ({r['case']}, {r['constexprs']}): {r['error']}" for r in records if r["error"]]
    assert not failures, "\n\n".join(failures)
    assert report["returncode"] == 0, report["stderr"][-3000:]

    compiled = {r["kernel"] for r in records}
    missing = sorted(set(triton_compile.kernels_defined()) - compiled)
    assert not missing, f"kernels the launch matrix never reaches: {missing}"
    cases = {r["case"].split()[0] for r in records}
    assert "model" in cases, "the patched-model family launched no kernel"

    assert all(r["registers"] is not None and r["spill_store_bytes"] is not None for r in records), \
        "ptxas reported no register or spill count"
    spilled = [
        f"{r['kernel']} ({r['case']}, {r['constexprs']}, {r['num_warps']} warps): {r['registers']} registers, "
        f"{r['spill_store_bytes']} + {r['spill_load_bytes']} bytes spilled"
        for r in records
        if r["constexprs"].get("BLOCK", 0) <= triton_compile.MODEL_BLOCK
        and r["spill_store_bytes"] + r["spill_load_bytes"] > _SPILL_TOLERANCE_BYTES
    ]
    assert not spilled, "\n".join(spilled)


@pytest.mark.skipif(not interpreter_enabled(), reason="kernels here are compiled, not interpreted")
def test_compile_only_refuses_interpreted_kernels():
    """This process built its kernels for the interpreter; compiling them must say so plainly."""
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        with triton_compile.compile_only(90):
            pass


def test_ptxas_log_parsing():
    log = ("ptxas-blackwell info    : Compiling entry function '_rms_norm_forward_kernel' for 'sm_90a'\n"
           "ptxas-blackwell info    : Function properties for _rms_norm_forward_kernel\n"
           "    560 bytes stack frame, 608 bytes spill stores, 600 bytes spill loads\n"
           "ptxas-blackwell info    : Used 64 registers, used 1 barriers, 560 bytes cumulative stack size\n")
    assert triton_compile._parse_ptxas_log(log) == (64, 608, 600)
    assert triton_compile._parse_ptxas_log("") == (None, None, None)
