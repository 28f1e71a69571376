"""GGUF export time and peak memory per quantisation method, against llama.cpp's quantiser.

    python scripts/bench_gguf.py                                  # ~155M-parameter Llama, CPU
    python scripts/bench_gguf.py --preset llama-3.1-8b --methods q4_k_m q8_0 --out benchmarks/gguf-export-gpu.json

A random Llama-shaped checkpoint (safetensors, 16-bit) is written once. Then, each in a fresh
process that samples its own anonymous resident memory (``RssAnon``: heap and tensors, not the
memory-mapped checkpoint pages) and CUDA peak memory:

* ``ours``: ``unsloth_like.save.gguf.convert(checkpoint, method)``: HF checkpoint -> GGUF in one
  step (on a CPU with our C quantisers, ``quants.c``, when a C compiler is present; the K-quants
  run on the GPU when there is one);
* ``llama.cpp``: ``llama_model_quantize`` (the ``llama-quantize`` tool, all CPU threads) from a
  BF16 GGUF of the same (bf16) weights, which holds them exactly. llama.cpp cannot read a HF
  checkpoint: its users first run ``convert_hf_to_gguf.py``, a step whose time (ours, for the
  same BF16 file) is reported separately as ``bf16_conversion_s``. (An F16 file would not do:
  bf16 values below F16's normal range lose bits there, so llama.cpp would quantise other
  numbers than we do.)

``ours-python`` (CPU only) is the same export with the C quantisers switched off: the torch
K-quants and the ``gguf`` package's numpy code that a machine without a C compiler falls back to
(``python_identical``: its file equals the C one byte for byte).

What a process pays once rather than per export is timed apart as ``setup_seconds``: the lazy
imports (transformers' configuration classes for ours, llama.cpp's libraries for theirs) and, the
first time on a machine, the build of our C quantisers.

Both outputs are compared tensor by tensor; ``identical`` says whether every byte matched.
Without llama-cpp-python (a GPU machine may lack it) only ours is measured, and the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from unsloth_like.testing.memory import rss_anon_bytes

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (256, 512, 2, 4, 2, 1024),  # for the test of this script
    "cpu-155m": (1024, 2816, 8, 16, 4, 32000),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
}


def build_checkpoint(directory: Path, preset: str) -> dict:
    import torch
    import transformers

    from unsloth_like.testing.tokenizer import TOKENIZERS, save_tokenizer

    hidden, intermediate, layers, heads, kv_heads, vocab = PRESETS[preset]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    save_tokenizer(TOKENIZERS["llama3"], directory, model_max_length=2048)
    return {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors"))}


class PeakMemory:
    """Samples RssAnon every 2 ms in a thread; CUDA's own peak counter where there is a GPU."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.baseline = self.peak = rss_anon_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        self.done.set()
        self.thread.join()
        self.result = {"peak_rss_increase_mib": round((self.peak - self.baseline) / 2**20, 1)}
        if self.cuda:
            self.result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def child(kind: str, source: str, target: str, method: str) -> dict:
    """One measurement, in this fresh process."""
    import gguf

    from unsloth_like.save.gguf import METHODS, convert
    from unsloth_like.testing import llamacpp

    # What a process pays once, not per export, stays off the clock (see the module's docstring).
    started = time.perf_counter()
    if kind in ("ours", "ours-python"):
        import transformers

        from unsloth_like.save.gguf import native

        transformers.AutoConfig.from_pretrained(source)
        if kind == "ours-python":  # what a machine without a C compiler runs
            native.available = lambda: False
        extra = {"quantisers": "C (quants.c)" if native.available() else "torch/numpy"}
    else:
        llamacpp._llama_cpp().llama_model_quantize_default_params()  # loads libllama
        extra = {}
    setup_seconds = time.perf_counter() - started
    with PeakMemory() as memory:
        started = time.perf_counter()
        if kind != "llama.cpp":
            convert(source, target, method, modelfile=False, overwrite=True)
        else:
            llamacpp.quantize_file(source, target, METHODS[method][0], threads=os.cpu_count())
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "setup_seconds": round(setup_seconds, 2), **extra, **memory.result,
            "bytes": Path(target).stat().st_size, "ftype": gguf.LlamaFileType(METHODS[method][0]).name}


def run_child(kind: str, source: Path, target: Path, method: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(source), str(target), method]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(repeats: int, kind: str, source: Path, target: Path, method: str) -> dict:
    """The fastest of ``repeats`` fresh-process runs (a shared machine's noise only ever adds
    time); every run's seconds are kept in ``all_seconds``."""
    runs = [run_child(kind, source, target, method) for _ in range(repeats)]
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "all_seconds": [run["seconds"] for run in runs]}


def identical(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    ours = {t.name: t for t in gguf.GGUFReader(a).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return list(ours) == list(theirs) and all(
        ours[n].tensor_type == theirs[n].tensor_type
        and np.array_equal(np.asarray(ours[n].data).view(np.uint8), np.asarray(theirs[n].data).view(np.uint8))
        for n in ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-155m")
    parser.add_argument("--methods", nargs="+", default=["q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of ours and of llama.cpp per method, the fastest reported (the torch/numpy "
                             "fallback runs once)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints and files go (default: a temp dir)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "SOURCE", "TARGET", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import torch

    from unsloth_like.testing import llamacpp

    compare = llamacpp.available()
    if not compare:
        print("llama-cpp-python is not installed: measuring ours only (no llama.cpp times, no byte comparison).",
              flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        root = Path(scratch)
        model = build_checkpoint(root / "hf", args.preset)
        bf16 = root / "model-bf16.gguf"  # llama.cpp's input: only made when llama.cpp runs
        bf16_run = run_child("ours", root / "hf", bf16, "bf16") if compare else None
        rows = []
        for method in args.methods:
            ours = best_of(args.repeats, "ours", root / "hf", root / f"ours-{method}.gguf", method)
            row = {"method": method, "ours": ours, "ours_python": None, "python_identical": None, "llama.cpp": None,
                   "identical": None}
            line = f"{method:8s} ours {ours['seconds']:7.1f} s  {ours['peak_rss_increase_mib']:8.0f} MiB"
            if not torch.cuda.is_available():  # on a GPU the K-quants run there on both paths: nothing to learn
                python = run_child("ours-python", root / "hf", root / f"python-{method}.gguf", method)
                row.update({"ours_python": python, "python_identical": identical(root / f"ours-{method}.gguf",
                                                                                 root / f"python-{method}.gguf")})
                line += f" | without C {python['seconds']:7.1f} s"
            if compare:
                theirs = best_of(args.repeats, "llama.cpp", bf16, root / f"llamacpp-{method}.gguf", method)
                same = identical(root / f"ours-{method}.gguf", root / f"llamacpp-{method}.gguf")
                row.update({"llama.cpp": theirs, "identical": same,
                            "time_ratio_ours_over_llamacpp": round(ours["seconds"] / theirs["seconds"], 2)})
                line += (f" | llama.cpp {theirs['seconds']:7.1f} s  {theirs['peak_rss_increase_mib']:8.0f} MiB"
                         f" | identical {same}")
            rows.append(row)
            print(line, flush=True)
            for name in (f"ours-{method}.gguf", f"python-{method}.gguf", f"llamacpp-{method}.gguf"):
                (root / name).unlink(missing_ok=True)
    result = {
        "benchmark": "gguf-export",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "compared_with_llamacpp": compare,
        "model": model,
        "bf16_conversion_s": bf16_run["seconds"] if bf16_run else None,
        "results": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
