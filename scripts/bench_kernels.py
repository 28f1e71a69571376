"""Kernel benchmarks: time and peak memory of every op against its baselines, in one run.

    python scripts/bench_kernels.py                  # CUDA if present, else the CPU memory study
    python scripts/bench_kernels.py --quick          # smaller sweep (a smoke run)
    python scripts/bench_kernels.py --out benchmarks/kernels-h100.json

On CUDA, for each op and a sweep of sizes, forward and forward+backward are timed with
``triton.testing.do_bench`` (median) for: ``unsloth_like`` (our Triton kernels), ``torch_eager``
(the op's torch reference), ``torch_compile`` (the reference through ``torch.compile``) and
``liger`` (Liger-Kernel, when installed). Peak memory is ``torch.cuda.max_memory_allocated``
above the inputs. Memory-bound ops also report achieved bandwidth (bytes an ideal kernel must
move / time) as a percentage of a measured device-to-device copy and of the device's nominal
HBM bandwidth when the device is known. Every ratio is against a baseline from the same run.

On CPU (no GPU timings are meaningful there) the script measures what is: peak memory of the
torch paths, fused linear cross-entropy against the unfused ``F.linear`` + ``F.cross_entropy``,
each case in a fresh subprocess, as peak RSS above the RSS after the inputs were built.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Nominal HBM bandwidth (bytes/s) by device-name fragment, for "% of peak".
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                     "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L4": 0.3e12}


# ---------------------------------------------------------------------------------------------
# GPU cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    size: str
    inputs: Callable[[], dict]  # builds fresh inputs (leaf tensors requiring grad where trained)
    variants: dict[str, Callable]  # name -> fn(**inputs) -> tensor or tuple of tensors
    bytes_fwd: int | None = None  # bytes an ideal kernel reads + writes (memory-bound ops)
    bytes_fwd_bwd: int | None = None


def _liger(path: str, name: str):
    try:
        module = __import__(path, fromlist=[name])
        return getattr(module, name)
    except Exception:  # not installed, or an incompatible version: the column stays empty
        return None


def _cross_entropy_with_vocab_block(block: int):
    """``cross_entropy`` walking the vocabulary in blocks of ``block`` columns instead of the default.

    The default block was chosen on CPU as the widest one ptxas compiles without register spills;
    this variant measures the wider, spilling block it replaced in the same run.
    """
    import importlib

    import unsloth_like.kernels as K

    module = importlib.import_module("unsloth_like.kernels.cross_entropy")

    def run(logits, labels):
        saved, module.MAX_VOCAB_BLOCK = module.MAX_VOCAB_BLOCK, block
        try:  # the gradient is written in the forward kernel: backward launches nothing
            return K.cross_entropy(logits, labels)
        finally:
            module.MAX_VOCAB_BLOCK = saved
    return run


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def gpu_cases(quick: bool) -> list[Case]:
    import unsloth_like.kernels as K

    dev, bf16 = "cuda", torch.bfloat16
    cases: list[Case] = []
    token_sweep = [4096] if quick else [4096, 16384]

    liger_rms = _liger("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    for tokens in token_sweep:
        for hidden in [4096] if quick else [4096, 8192]:
            def make(tokens=tokens, hidden=hidden):
                return {"x": torch.randn(tokens, hidden, device=dev, dtype=bf16, requires_grad=True),
                        "weight": torch.randn(hidden, device=dev, dtype=bf16, requires_grad=True)}
            n = tokens * hidden * 2
            variants = {"unsloth_like": K.rms_norm, "torch_eager": K.rms_norm_reference}
            if liger_rms:
                variants["liger"] = lambda x, weight: liger_rms.apply(x, weight, 1e-6, 0.0, "llama", False)
            cases.append(Case("rms_norm", f"{tokens}x{hidden}", make, variants, 2 * n, 5 * n))

    liger_swiglu = _liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    for tokens in token_sweep:
        inter = 14336
        def make(tokens=tokens, inter=inter):
            return {"gate": torch.randn(tokens, inter, device=dev, dtype=bf16, requires_grad=True),
                    "up": torch.randn(tokens, inter, device=dev, dtype=bf16, requires_grad=True)}
        n = tokens * inter * 2
        variants = {"unsloth_like": K.swiglu, "torch_eager": K.swiglu_reference}
        if liger_swiglu:
            variants["liger"] = lambda gate, up: liger_swiglu.apply(gate, up)
        cases.append(Case("swiglu", f"{tokens}x{inter}", make, variants, 3 * n, 8 * n))

    liger_rope = _liger("liger_kernel.ops.rope", "LigerRopeFunction")
    for seq in token_sweep:
        heads, kv_heads, head_dim = 32, 8, 128
        def make(seq=seq):
            inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim)
            emb = torch.outer(torch.arange(seq, device=dev).float(), inv).repeat(1, 2)
            return {"q": torch.randn(1, heads, seq, head_dim, device=dev, dtype=bf16, requires_grad=True),
                    "k": torch.randn(1, kv_heads, seq, head_dim, device=dev, dtype=bf16, requires_grad=True),
                    "cos": emb.cos()[None].to(bf16), "sin": emb.sin()[None].to(bf16)}
        n = seq * (heads + kv_heads) * head_dim * 2
        variants = {"unsloth_like": K.apply_rope, "torch_eager": K.apply_rope_reference}
        if liger_rope:
            variants["liger"] = lambda q, k, cos, sin: liger_rope.apply(q, k, cos, sin)
        cases.append(Case("apply_rope", f"seq{seq}-h32/8x128", make, variants, 2 * n, 4 * n))

    liger_ln = _liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction")
    for tokens in token_sweep:
        hidden = 1280
        def make(tokens=tokens, hidden=hidden):
            return {"x": torch.randn(tokens, hidden, device=dev, dtype=bf16, requires_grad=True),
                    "weight": torch.randn(hidden, device=dev, dtype=bf16, requires_grad=True),
                    "bias": torch.randn(hidden, device=dev, dtype=bf16, requires_grad=True)}
        n = tokens * hidden * 2
        variants = {"unsloth_like": K.layer_norm, "torch_eager": K.layer_norm_reference}
        if liger_ln:
            variants["liger"] = lambda x, weight, bias: liger_ln.apply(x, weight, bias, 1e-5)
        cases.append(Case("layer_norm", f"{tokens}x{hidden}", make, variants, 2 * n, 5 * n))

    liger_ce = _liger("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction")
    for tokens in token_sweep:
        for vocab in [128256] if quick else [32000, 128256, 262144]:
            def make(tokens=tokens, vocab=vocab):
                return {"logits": torch.randn(tokens, vocab, device=dev, dtype=bf16, requires_grad=True),
                        "labels": torch.randint(0, vocab, (tokens,), device=dev)}
            n = tokens * vocab * 2
            variants = {"unsloth_like": K.cross_entropy,
                        "unsloth_like_block32768": _cross_entropy_with_vocab_block(32768),
                        "torch_eager": lambda logits, labels: F.cross_entropy(logits.float(), labels)}
            if liger_ce:
                variants["liger"] = lambda logits, labels: _first(liger_ce.apply(logits, labels, None))
            cases.append(Case("cross_entropy", f"{tokens}x{vocab}", make, variants, 2 * n, 4 * n))

    liger_flce = _liger("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    for tokens in token_sweep:
        hidden, vocab = 4096, 128256
        def make(tokens=tokens):
            return {"hidden": torch.randn(tokens, hidden, device=dev, dtype=bf16, requires_grad=True),
                    "weight": (torch.randn(vocab, hidden, device=dev, dtype=bf16) * 0.02).requires_grad_(True),
                    "labels": torch.randint(0, vocab, (tokens,), device=dev)}
        variants = {"unsloth_like": K.fused_linear_cross_entropy,
                    "torch_eager": lambda hidden, weight, labels: F.cross_entropy(
                        F.linear(hidden, weight).float(), labels)}
        if liger_flce:
            variants["liger"] = lambda hidden, weight, labels: _first(liger_flce.apply(hidden, weight, labels))
        cases.append(Case("fused_linear_cross_entropy", f"{tokens}x{hidden}->V{vocab}", make, variants))

    cases.extend(_dequant_cases(quick))
    return cases


def _dequant_cases(quick: bool) -> list[Case]:
    import bitsandbytes.functional as bnbf

    import unsloth_like.kernels as K

    shapes = [(4096, 14336)] if quick else [(4096, 4096), (4096, 14336), (14336, 4096)]
    cases = []
    for rows, cols in shapes:
        def make(rows=rows, cols=cols):
            packed, state = bnbf.quantize_4bit(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16),
                                               quant_type="nf4", compress_statistics=True)
            return {"packed": packed, "quant_state": state}
        n = rows * cols
        variants = {"unsloth_like": K.dequantize_nf4, "torch_eager": K.dequantize_nf4_reference,
                    "bitsandbytes": lambda packed, quant_state: bnbf.dequantize_4bit(packed, quant_state)}
        cases.append(Case("dequantize_nf4", f"{rows}x{cols}", make, variants, n // 2 + 2 * n, None))
    return cases


def _backward_fn(fn, inputs):
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) if o.dim() else None for o in outs]

    def step():
        result = fn(**inputs)
        results = result if isinstance(result, tuple) else (result,)
        torch.autograd.backward(results, grads)
    return step, leaves


def measure_gpu(case: Case, name: str, fn, compiled: bool) -> list[dict]:
    import triton.testing

    rows = []
    fn = torch.compile(fn, dynamic=False) if compiled else fn
    for mode in ("fwd", "fwd+bwd"):
        torch.cuda.empty_cache()
        inputs = case.inputs()
        trains = any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values())
        if mode == "fwd+bwd" and not trains:
            continue
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    fn(**inputs)
            leaves = []
        else:
            step, leaves = _backward_fn(fn, inputs)
        try:
            step()  # warm-up, compiles
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=leaves or None, return_mode="median")
        except Exception as error:  # record and move on: one failing baseline must not end the run
            rows.append({"op": case.op, "size": case.size, "variant": name, "pass": mode,
                         "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        moved = case.bytes_fwd if mode == "fwd" else case.bytes_fwd_bwd
        rows.append({"op": case.op, "size": case.size, "variant": name, "pass": mode, "ms": ms,
                     "peak_mib": peak / 2**20, "gbps": (moved / (ms * 1e-3) / 1e9) if moved else None})
        del inputs
    return rows


def copy_bandwidth() -> float:
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=30, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def run_gpu(quick: bool, on_case=None) -> dict:
    """Every GPU case; ``on_case(report)`` gets the report so far after each case (a run stopped
    by a time limit still leaves its finished cases behind)."""
    name = torch.cuda.get_device_name()
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    copy_bw = copy_bandwidth()
    rows = []
    cases = gpu_cases(quick)
    # Eager variants of every case first, torch.compile baselines after: compiling takes most of
    # the time, so a run cut short by a time limit still has every op against eager and Liger.
    passes = [(case, False) for case in cases] + [(case, True) for case in cases]
    for done, (case, compiled) in enumerate(passes, 1):
        if compiled:
            rows += measure_gpu(case, "torch_compile", case.variants["torch_eager"], compiled=True)
        else:
            for variant, fn in case.variants.items():
                rows += measure_gpu(case, variant, fn, compiled=False)
        _print_case([row for row in rows if (row["variant"] == "torch_compile") == compiled], case)
        for row in rows:
            if row.get("gbps"):
                row["pct_copy_bw"] = 100 * row["gbps"] * 1e9 / copy_bw
                row["pct_nominal_bw"] = 100 * row["gbps"] * 1e9 / nominal if nominal else None
        report = {"device": name, "copy_bandwidth_gbps": copy_bw / 1e9, "nominal_bandwidth_gbps":
                  nominal / 1e9 if nominal else None, "results": rows, "complete": done == len(passes)}
        if on_case is not None:
            on_case(report)
    return report


def _print_case(rows, case):
    for row in rows:
        if row["op"] == case.op and row["size"] == case.size:
            timing = f"{row['ms']:8.3f} ms  {row['peak_mib']:9.1f} MiB" if "ms" in row else row["error"]
            print(f"{row['op']:<28} {row['size']:<22} {row['variant']:<14} {row['pass']:<8} {timing}", flush=True)


# ---------------------------------------------------------------------------------------------
# CPU memory study (fresh subprocess per case, peak RSS)
# ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def cpu_case(spec: dict) -> dict:
    """Run one CPU case in this (fresh) process and return its peak memory above the inputs."""
    import time

    from unsloth_like.kernels import fused_linear_cross_entropy

    torch.manual_seed(0)
    tokens, hidden, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_(spec["train_lm_head"])
    labels = torch.randint(0, vocab, (tokens,))
    baseline = _rss_bytes()
    started = time.perf_counter()
    if spec["variant"] == "fused":
        loss = fused_linear_cross_entropy(h, w, labels)
    else:
        loss = F.cross_entropy(F.linear(h, w), labels)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {**spec, "peak_mib": (peak - baseline) / 2**20, "seconds": seconds, "loss": loss.item(),
            "logits_mib": tokens * vocab * 4 / 2**20}


def run_cpu(quick: bool) -> dict:
    shapes = [(4096, 256, 128256)] if quick else [(4096, 256, 32000), (4096, 256, 128256), (4096, 256, 262144)]
    rows = []
    for tokens, hidden, vocab in shapes:
        for train_lm_head in (False, True):
            for variant in ("unfused", "fused"):
                spec = {"op": "fused_linear_cross_entropy", "variant": variant, "tokens": tokens, "hidden": hidden,
                        "vocab": vocab, "train_lm_head": train_lm_head}
                done = subprocess.run([sys.executable, __file__, "--cpu-case", json.dumps(spec)],
                                      capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{variant:<8} N={tokens} H={hidden} V={vocab} lm_head trained={train_lm_head!s:<5} "
                      f"peak {row['peak_mib']:8.1f} MiB  {row['seconds']:6.1f} s", flush=True)
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "results": rows}


def markdown(report: dict) -> str:
    rows = report["results"]
    if report["device"].startswith("CPU"):
        lines = ["| tokens x hidden -> vocab | lm_head trained | unfused peak MiB | fused peak MiB | fused / unfused |",
                 "|---|---|---|---|---|"]
        for fused in (r for r in rows if r["variant"] == "fused"):
            unfused = next(r for r in rows if r["variant"] == "unfused" and all(
                r[k] == fused[k] for k in ("tokens", "hidden", "vocab", "train_lm_head")))
            lines.append(f"| {fused['tokens']} x {fused['hidden']} -> {fused['vocab']} | {fused['train_lm_head']} | "
                         f"{unfused['peak_mib']:.0f} | {fused['peak_mib']:.0f} | "
                         f"{fused['peak_mib'] / unfused['peak_mib']:.3f} |")
        return "\n".join(lines)
    lines = ["| op | size | pass | variant | ms | x vs eager | peak MiB | % copy BW |", "|---|---|---|---|---|---|---|---|"]
    first_seen = {}
    for row in rows:
        first_seen.setdefault((row["op"], row["size"]), len(first_seen))
    # each case's rows together (torch.compile rows are measured after all eager ones)
    for row in sorted(rows, key=lambda r: first_seen[(r["op"], r["size"])]):
        if "ms" not in row:
            continue
        eager = next((r for r in rows if r["op"] == row["op"] and r["size"] == row["size"]
                      and r["pass"] == row["pass"] and r["variant"] == "torch_eager" and "ms" in r), None)
        speedup = f"{eager['ms'] / row['ms']:.2f}" if eager else "-"
        bw = f"{row['pct_copy_bw']:.0f}" if row.get("pct_copy_bw") else "-"
        lines.append(f"| {row['op']} | {row['size']} | {row['pass']} | {row['variant']} | {row['ms']:.3f} | "
                     f"{speedup} | {row['peak_mib']:.0f} | {bw} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/kernels-<device>.json)")
    parser.add_argument("--cpu-case", default=None, help=argparse.SUPPRESS)  # internal: one CPU subprocess case
    args = parser.parse_args()
    if args.cpu_case:
        print(json.dumps(cpu_case(json.loads(args.cpu_case))))
        return
    import unsloth_like

    slug = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / f"kernels-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:
        report.update({"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "unsloth_like": unsloth_like.__version__, "quick": args.quick})
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)  # atomic: an interrupted run never leaves a half-written result

    if torch.cuda.is_available():
        report = run_gpu(args.quick, on_case=write)  # written after every case
    else:
        report = run_cpu(args.quick)
        write(report)
    print(f"\n{markdown(report)}\n\nwritten to {out}")


if __name__ == "__main__":
    main()
