"""``unsloth-like bench``: plain transformers + PEFT against ours, as a report with tables and plots.

    unsloth-like bench                          # LoRA and QLoRA at 256/512/1024 tokens per row
    unsloth-like bench --modes lora --seq 512 2048 --vocab 128256
    unsloth-like bench --size small --vocab 32000 128256 151936 262144 --seq 512 2048 --name vocab
    unsloth-like bench --max-seq                # GPU: also the longest batch-1 context each variant fits
    unsloth-like bench --quick                  # a one-minute smoke run of the whole pipeline

Every cell (a mode, a vocabulary when ``--vocab`` names several, and a sequence length) runs each
variant in a fresh process on the same seeded weights and the same batch (``train_step``): a few
warm-up steps, then timed optimizer steps, of
which the median is reported; on a CPU each variant runs twice, interleaved with the others, and
the faster run counts (``--repeats``).
Variants: ``hf`` (the plain model with ``peft.get_peft_model``), ``unsloth_like``
(``FastLanguageModel.get_peft_model`` on the patched model) and the peers that are installed:
``hf_liger`` (liger-kernel, GPU) and ``unsloth`` (Unsloth itself, loading the same model from a
temporary checkpoint, its adapters starting from ``hf``'s: ``unsloth_variant``). Every cell has
the same number of tokens per step (the batch shrinks as
the rows grow), so throughput is comparable across the row. Ratios (ours / HF) come from the same
run. The model: on a CPU the zoo Llama (random weights, 13.8M parameters; ``--size small``: at
SmolLM2-135M's width, 4 layers); on a GPU Llama-3.1-8B's dimensions (random weights, no hub needed).
``--vocab`` resizes the embeddings (and the untied lm_head) to each vocabulary named.

Writes ``report-<device>.json`` (every measurement), ``report-<device>.md`` (the table) and
``report-<device>.png`` (throughput and peak memory per cell; needs the ``plots`` extra) into
``--out`` (default ``benchmarks``), each atomically; ``--name N`` makes them ``report-<device>-N.*``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
from pathlib import Path

import torch

from ..testing.reports import write_atomically, write_report
from . import train_step
from .unsloth_variant import PeerCheckpoints

CPU_DEFAULTS = {"seq": [256, 512, 1024], "tokens_per_step": 2048, "warmup": 2, "steps": 7, "repeats": 2}
GPU_DEFAULTS = {"seq": [1024, 4096], "tokens_per_step": 8192, "warmup": 3, "steps": 10, "repeats": 1}
QUICK = {"seq": [64], "tokens_per_step": 128, "warmup": 1, "steps": 2, "repeats": 1}
LABELS = {"hf": "HF + PEFT", "unsloth_like": "ours", "hf_liger": "HF + PEFT + Liger", "unsloth": "Unsloth"}
# variant: (the package it needs, the device it needs); Unsloth has had a CPU backend since 2026.10
PEERS = {"hf_liger": ("liger_kernel", "cuda"), "unsloth": ("unsloth", None)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", nargs="+", choices=("lora", "qlora", "full"), default=["lora", "qlora"],
                        help="what to train: LoRA, QLoRA (NF4 base), full finetuning (default: lora qlora)")
    parser.add_argument("--seq", nargs="+", type=int, default=None,
                        help="tokens per row, one cell each (default: 256 512 1024 on CPU, 1024 4096 on GPU)")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="tokens per optimizer step in every cell; batch = this / seq "
                             "(default: 2048 CPU, 8192 GPU)")
    parser.add_argument("--model", choices=train_step.TEXT_MODELS, default="llama",
                        help="model family (CPU: the zoo's model; GPU: the family's real dimensions)")
    parser.add_argument("--vocab", nargs="+", type=int, default=None,
                        help="resize the embeddings to this many rows first; several: one cell each")
    parser.add_argument("--size", choices=("zoo", "small"), default="zoo",
                        help="CPU, llama: small = SmolLM2-135M's width, 4 layers (default: the zoo's test model)")
    parser.add_argument("--name", default=None, help="suffix of the report files: report-<device>-NAME.*")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh-process runs per variant and cell, interleaved; the fastest is reported "
                             "(default: 2 on CPU, 1 on GPU)")
    parser.add_argument("--max-seq", action="store_true", help="GPU: the longest batch-1 context each variant fits")
    parser.add_argument("--quick", action="store_true", help="tiny cells, to check the pipeline end to end")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="directory for the report files")


def settings(args: argparse.Namespace, device: str) -> dict:
    """The run's shape: the device defaults, ``--quick``, then explicit flags, in that order."""
    chosen = dict(CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS)
    if args.quick:
        chosen.update(QUICK)
    for key in ("seq", "tokens_per_step", "warmup", "steps", "repeats"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    too_long = [seq for seq in chosen["seq"] if seq > chosen["tokens_per_step"]]
    if too_long:
        raise ValueError(f"--seq {too_long[0]} is longer than --tokens-per-step {chosen['tokens_per_step']}: a step "
                         f"holds at least one row; raise --tokens-per-step or shorten --seq.")
    if min(chosen["seq"]) < 1 or chosen["steps"] < 1 or chosen["repeats"] < 1 or chosen["warmup"] < 0:
        raise ValueError("--seq, --steps and --repeats must be at least 1 and --warmup at least 0.")
    if args.size == "small" and (device != "cpu" or args.model != "llama"):
        raise ValueError("--size small is the CPU Llama's (on a GPU the model already has a real model's dimensions); "
                         "drop --size or use --model llama on a CPU.")
    if args.vocab and min(args.vocab) < 2:
        raise ValueError(f"--vocab {min(args.vocab)} is too small: a vocabulary has at least 2 tokens.")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise ValueError(f"--name {args.name!r} must be letters, digits, '.', '_' or '-' (it names files).")
    return chosen


def variants(device: str) -> list[str]:
    """The baseline, ours, and every peer that is installed and runs on ``device``."""
    peers = [variant for variant, (package, needs) in PEERS.items()
             if needs in (None, device) and importlib.util.find_spec(package) is not None]
    return ["hf", "unsloth_like", *peers]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace, shape: dict) -> dict:
    """Measure every cell of ``shape`` (``settings``) and write the report files; returns the report."""
    device = device_type()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with PeerCheckpoints() as checkpoints:  # the unsloth variant's saved models, removed at the end
        cells = [_cell(device, args, shape, mode, vocab, seq, checkpoints)
                 for mode in args.modes for vocab in args.vocab or [None] for seq in shape["seq"]]
        longest = _longest_contexts(device, args, checkpoints) if args.max_seq and device == "cuda" else None
    vocabularies = sorted({cell["vocab"] for cell in cells if cell["vocab"] is not None})
    report = {"benchmark": "train-report", "device": name, "date": datetime.date.today().isoformat(),
              "versions": _versions(), "model": args.model, "size": args.size,
              "vocab": vocabularies if len(vocabularies) > 1 else next(iter(vocabularies), None),
              **shape,
              "cells": cells}
    if longest is not None:
        report["longest_context_batch1"] = longest
    slug = "cpu" if device == "cpu" else name.split()[-1].lower()
    write(report, args.out, slug if args.name is None else f"{slug}-{args.name}")
    return report


def _longest_contexts(device: str, args: argparse.Namespace, checkpoints: PeerCheckpoints) -> dict:
    """The longest batch-1 context of every variant, mode (and vocabulary, when several)."""
    return {f"{mode}/" + (f"{vocab}/" if len(args.vocab or []) > 1 else "") + variant:
            train_step.longest_sequence({"device": device, "variant": variant, "mode": mode, "model": args.model,
                                         "vocab": vocab, "gradient_checkpointing": True}, checkpoints=checkpoints)
            for mode in args.modes for vocab in args.vocab or [None] for variant in variants(device)}


def _cell(device: str, args: argparse.Namespace, shape: dict, mode: str, vocab: int | None, seq: int,
          checkpoints: PeerCheckpoints) -> dict:
    """One cell: every variant ``shape["repeats"]`` times in fresh processes, the fastest counting."""
    batch = shape["tokens_per_step"] // seq
    runs: dict[str, list[dict]] = {variant: [] for variant in variants(device)}
    for _ in range(shape["repeats"]):  # interleaved, so a slow spell of the machine hits every variant
        for variant in runs:
            spec = {"device": device, "variant": variant, "mode": mode, "model": args.model, "size": args.size,
                    "gradient_checkpointing": device == "cuda", "vocab": vocab, "batch": batch,
                    "seq": seq, "warmup": shape["warmup"], "steps": shape["steps"]}
            row = train_step.run_subprocess(spec, checkpoints)
            runs[variant].append(row if row is not None else {**spec, "out_of_memory": True})
            print(_progress(mode, seq, batch, runs[variant][-1]), flush=True)
    rows = [fastest(variant_runs) for variant_runs in runs.values()]
    measured = next((row["vocab"] for row in rows if "vocab" in row and not row.get("out_of_memory")), vocab)
    return {"mode": mode, "vocab": measured, "seq": seq, "batch": batch, "rows": rows, **ratios(rows)}


def fastest(runs: list[dict]) -> dict:
    """The run with the shortest median step (a shared machine's noise only ever adds time), with
    every run's step time kept; out of memory if any run was."""
    out_of_memory = [run for run in runs if run.get("out_of_memory")]
    if out_of_memory:
        return out_of_memory[0]
    best = min(runs, key=lambda run: run["s_per_step"])
    return {**best, "s_per_step_of_each_run": [run["s_per_step"] for run in runs]}


def ratios(rows: list[dict]) -> dict:
    """Ours / HF in one cell (when both fitted): throughput, peak memory, the first and last losses'
    differences (the same weights and batch: they should agree to float rounding); ours / each
    peer that fitted under ``versus``."""
    by = {row["variant"]: row for row in rows if not row.get("out_of_memory")}
    if "unsloth_like" not in by:
        return {}
    ours = by["unsloth_like"]
    versus = {peer: _compare(ours, by[peer]) for peer in PEERS if peer in by}
    return {**(_compare(ours, by["hf"]) if "hf" in by else {}), **({"versus": versus} if versus else {})}


def _compare(ours: dict, other: dict) -> dict:
    return {**train_step.ours_over(ours, other),
            "first_loss_difference": abs(ours["losses"][0] - other["losses"][0]),
            "last_loss_difference": abs(ours["losses"][-1] - other["losses"][-1])}


def write(report: dict, out: Path, slug: str) -> list[Path]:
    """``report-<slug>.json``, ``.md`` and (with matplotlib) ``.png`` in ``out``; returns the paths."""
    stem = out / f"report-{slug}"
    json_path = stem.with_suffix(".json")
    write_report(json_path, report)
    md_path = stem.with_suffix(".md")
    write_atomically(md_path, markdown(report, png_name=f"{stem.name}.png").encode())
    written = [json_path, md_path]
    if importlib.util.find_spec("matplotlib") is None:
        print("No plot: matplotlib is not installed (pip install 'unsloth-like[plots]').")
    else:
        png_path = stem.with_suffix(".png")
        write_atomically(png_path, plot(report))
        written.append(png_path)
    for path in written:
        print(f"written to {path}")
    return written


def markdown(report: dict, png_name: str | None = None) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    by_vocab = isinstance(report["vocab"], list)  # several vocabularies: a column of its own
    model = f"`{report['model']}`" + (" at SmolLM2-135M's width (4 layers)" if report.get("size") == "small" else "")
    vocabulary = "vocabulary per row" if by_vocab else f"vocabulary {report['vocab']}"
    others = [LABELS[variant] for variant in LABELS if variant != "unsloth_like" and any(
        row["variant"] == variant for cell in report["cells"] for row in cell["rows"])]
    lines = [f"### Training step: {', '.join(others) or 'HF + PEFT'} vs ours ({report['device']}, {report['date']})", "",
             f"`unsloth-like bench`: model {model} ({vocabulary}), "
             f"{report['tokens_per_step']} tokens per step, {report['warmup']} warm-up + {report['steps']} timed "
             f"steps (the median step of the fastest of {report['repeats']} runs), each variant in a fresh "
             f"process on the same weights and batch; {versions}.", "",
             "| mode |" + (" vocab |" if by_vocab else "") + " seq x batch | variant | tokens/s | s/step | peak MiB "
             "| ours / HF | loss diff (first, last) |",
             "|---|" + ("---|" if by_vocab else "") + "---|---|---|---|---|---|---|"]
    for cell in report["cells"]:
        head = f"| {cell['mode']} |" + (f" {cell['vocab']} |" if by_vocab else "") + f" {cell['seq']} x {cell['batch']} |"
        for row in cell["rows"]:
            label = LABELS.get(row["variant"], row["variant"])
            if row.get("out_of_memory"):
                lines.append(f"{head} {label} | out of memory | | | | |")
                continue
            # ours / HF on our row; on a peer's row, ours / that peer, said so
            ours = row["variant"] == "unsloth_like" and "tokens_per_s_ratio" in cell
            against = cell if ours else cell.get("versus", {}).get(row["variant"])
            versus, loss = "", ""
            if against is not None:
                versus = (("" if ours else f"ours / {label}: ") + f"time {1 / against['tokens_per_s_ratio']:.2f}x, "
                          f"memory {against['peak_memory_ratio']:.2f}x")
                loss = f"{against['first_loss_difference']:.1e}, {against['last_loss_difference']:.1e}"
            lines.append(f"{head} {label} | {row['tokens_per_s']:.0f} | {row['s_per_step']:.3f} "
                         f"| {row['peak_mib']:.0f} | {versus} | {loss} |")
    if report.get("longest_context_batch1"):
        lines += ["", "Longest batch-1 context that fits: " + ", ".join(
            f"{key} {value if value else 'below the first size tried'}"
            for key, value in report["longest_context_batch1"].items()) + "."]
    if png_name:
        lines += ["", f"![throughput and peak memory]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(report: dict) -> bytes:
    """Two panels of grouped bars, one group per cell: tokens/s and peak memory per variant."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the session's backend
    import matplotlib.pyplot as plt

    cells = report["cells"]
    by_vocab = isinstance(report["vocab"], list)
    names = [f"{cell['mode']}\n" + (f"V {cell['vocab']}\n" if by_vocab else "") + f"{cell['seq']} x {cell['batch']}"
             for cell in cells]
    order = [variant for variant in LABELS if any(row["variant"] == variant for cell in cells for row in cell["rows"])]
    width = 0.8 / len(order)
    if len(cells) > 6:  # many cells: the panels one above the other, so the figure stays readable
        figure, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(cells)), 8))
    else:
        figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cells) * 2), 4))
    for axis, key, title in ((axes[0], "tokens_per_s", "tokens / s (higher is better)"),
                             (axes[1], "peak_mib", "peak memory, MiB (lower is better)")):
        for k, variant in enumerate(order):
            values = [next((row.get(key, 0.0) for row in cell["rows"] if row["variant"] == variant), 0.0)
                      for cell in cells]
            axis.bar([i + (k - (len(order) - 1) / 2) * width for i in range(len(cells))], values, width,
                     label=LABELS[variant])
        axis.set_xticks(range(len(cells)), names)
        axis.set_title(title)
        axis.legend()
    vocabulary = "vocabularies " + ", ".join(map(str, report["vocab"])) if by_vocab else f"vocabulary {report['vocab']}"
    figure.suptitle(f"{report['device']}, {report['date']}: model {report['model']}, {vocabulary}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _progress(mode: str, seq: int, batch: int, row: dict) -> str:
    head = f"{mode:<6} {seq:>6} x {batch:<3} {LABELS.get(row['variant'], row['variant']):<18}"
    if row.get("out_of_memory"):
        return head + " out of memory"
    return (f"{head} {row['tokens_per_s']:9.0f} tok/s {row['s_per_step']:8.3f} s/step {row['peak_mib']:9.0f} MiB"
            f"  loss {row['losses'][0]:.5f}")


def _versions() -> dict:
    """The versions that decide the numbers: ours' dependencies, and the peers that ran."""
    from ..env import package_version

    peers = [PEERS[variant][0].replace("_", "-") for variant in variants(device_type()) if variant in PEERS]
    return {name: package_version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", *peers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unsloth-like bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        shape = settings(args, device_type())
    except ValueError as error:
        parser.error(str(error))
    run(args, shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
