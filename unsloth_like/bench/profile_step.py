"""Where one training step's time goes, HF + PEFT against ours: torch's profiler over one step of each
variant (each in a fresh process, built as ``train_step`` builds it), operators grouped by what they do.

    python -m unsloth_like.bench.profile_step --size small --vocab 128256 --seq 512 --batch 2
    python -m unsloth_like.bench.profile_step --mode qlora --vocab 32000 --seq 2048 --batch 1

Groups (each operator's self CPU time, in the first group that claims it):

* ``lm_head matmuls``: matmuls with the vocabulary among their input sizes;
* ``loss``: the other operators on vocabulary-sized tensors (softmax, its gradient, the zeros a
  gathered gradient is scattered into, our fused loss's own Python);
* ``attention``: scaled-dot-product attention, forward and backward;
* ``decoder matmuls``: every other matmul (the projections and their LoRA adapters);
* ``optimizer``: AdamW's step;
* ``other``: the rest (norms, RoPE, activations, NF4 dequantisation, copies).

The profiled step runs after ``--warmup`` steps; the step just before it is timed without the
profiler, so the table's total (profiler overhead included) can be read against a plain step.
CPU only: on a GPU the time is in kernels that CPU self time does not show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..testing.reports import write_report
from . import train_step
from .report import LABELS

GROUPS = ("lm_head matmuls", "loss", "attention", "decoder matmuls", "optimizer", "other")
_MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
_EMBEDDING = {"aten::embedding", "aten::index_select", "aten::embedding_backward", "aten::embedding_dense_backward"}


def group_of(name: str, input_shapes, vocab: int) -> str:
    """The group (``GROUPS``) of one profiled operator, from its name and its inputs' sizes."""
    on_vocab = any(vocab in shape for shape in input_shapes if shape)
    if name in _MATMULS:
        return "lm_head matmuls" if on_vocab else "decoder matmuls"
    if on_vocab and name not in _EMBEDDING:
        return "loss"
    if "scaled_dot_product" in name:
        return "attention"
    if name.startswith("Optimizer.") or "_foreach_" in name:
        return "optimizer"
    return "other"


def profile_variant(spec: dict) -> dict:
    """One variant in this (fresh) process: warm-up steps, one plain timed step, one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    spec = dict(spec)
    step, vocab = train_step.prepare_step(spec)
    for _ in range(spec["warmup"]):
        step()
    started = time.perf_counter()
    step()
    plain = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        step()
    groups = dict.fromkeys(GROUPS, 0.0)
    for event in profiler.key_averages(group_by_input_shape=True):
        groups[group_of(event.key, event.input_shapes, vocab)] += event.self_cpu_time_total / 1e6
    return {**spec, "vocab": vocab, "step_seconds": plain, "groups": groups}


def markdown(rows: list[dict]) -> str:
    """A table of seconds per group, one column per variant, with ours minus HF when both ran."""
    by = {row["variant"]: row for row in rows}
    both = "hf" in by and "unsloth_like" in by
    names = [LABELS.get(variant, variant) for variant in by]
    lines = ["| where | " + " | ".join(f"{name} (s)" for name in names) + (" | ours - HF (s) |" if both else " |"),
             "|---|" + "---|" * (len(by) + both)]
    for group in (*GROUPS, "total (profiled)"):
        values = [sum(row["groups"].values()) if group.startswith("total") else row["groups"][group]
                  for row in by.values()]
        difference = ""
        if both:
            ours, hf = values[list(by).index("unsloth_like")], values[list(by).index("hf")]
            difference = f" {ours - hf:+.3f} |"
        lines.append(f"| {group} | " + " | ".join(f"{value:.3f}" for value in values) + " |" + difference)
    lines.append("| step without the profiler | " + " | ".join(f"{row['step_seconds']:.3f}" for row in by.values())
                 + " |" + (" |" if both else ""))
    return "\n".join(lines) + "\n"


def _run_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "unsloth_like.bench.profile_step", "--variant-spec", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {spec['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    parser.add_argument("--size", choices=("zoo", "small"), default="small",
                        help="small (default): the zoo Llama at SmolLM2-135M's width, 4 layers; zoo: the test model")
    parser.add_argument("--vocab", type=int, default=128256, help="resize the embeddings to this many rows first")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed and the profiled one")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    parser.add_argument("--variant-spec", default=None, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args(argv)
    if args.variant_spec:
        print(json.dumps(profile_variant(json.loads(args.variant_spec))))
        return 0
    if torch.cuda.is_available():
        parser.error("this profile reads CPU self time: run it on a CPU machine (or with CUDA_VISIBLE_DEVICES=).")
    if min(args.vocab, args.seq, args.batch) < 1 or args.warmup < 0:
        parser.error("--vocab, --seq and --batch must be at least 1 and --warmup at least 0.")
    rows = []
    for variant in ("hf", "unsloth_like"):
        spec = {"device": "cpu", "variant": variant, "mode": args.mode, "model": "llama", "size": args.size,
                "gradient_checkpointing": False, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                "warmup": args.warmup}
        rows.append(_run_subprocess(spec))
    table = markdown(rows)
    print(table)
    if args.out is not None:
        write_report(args.out, {"benchmark": "train-step-profile", "date": time.strftime("%Y-%m-%d"),
                                "torch": torch.__version__, "results": rows, "markdown": table})
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
