"""Every GPU check and benchmark in one budgeted run, for the rare, short GPU session.

A session is lent a GPU machine for about 15 minutes in all, machine start included, and one
command may run 10 minutes. This script runs the GPU work in order of importance, gives each step
a time limit, starts no step that cannot finish before ``--budget`` runs out, and writes what
each step did to ``<out>/session.json`` after every step, so a killed run still reports:

1. ``env``: versions and the device;
2. ``gpu-tests``: ``pytest -m gpu`` (compiled kernels against their references, the 30-step loss
   curve with compiled kernels, offloaded checkpointing, QLoRA through bitsandbytes on CUDA,
   CUDA K-quants equal to the CPU's);
3. ``train-lora`` / ``train-qlora``: ``bench_train.py`` on Llama-3.1-8B dimensions (the issue's
   2.3x tokens/s and 0.35x memory targets); ``train-vlm-qlora``: the QLoRA step of a VLM with
   Qwen2-VL-7B's dimensions, an image in every row;
   ``rl``: ``bench_rl.py`` (a DPO and a GRPO step through TRL, ours vs plain TRL + PEFT; its
   numbers are printed to ``session.log``); ``train-phi`` / ``train-gemma``: the LoRA step with
   Phi-4-mini's and Gemma-3-4B's text dimensions (numbers in ``session.log``); ``ddp-nccl``:
   ``torchrun`` with NCCL through the Trainer's DDP (one process) on a zoo model;
4. ``kernels``: ``bench_kernels.py --quick`` (bandwidth, cross-entropy block sizes, Liger);
   ``train-liger``: the LoRA step of HF + PEFT with Liger-Kernel applied (its peer);
   ``train-unsloth``: the LoRA step of ours against Unsloth itself (numbers in ``session.log``;
   skipped unless Unsloth is installed: ``gpu_wheels.sh peers``, a second carry into the same
   ``--target``);
5. ``kernel-suite``: the whole kernel test suite, compiled, on CUDA tensors;
6. ``gguf-8b``: the 8B q4_k_m export (against llama.cpp when its wheel is there; ~45 GB of disk);
7. ``max-seq``: the longest batch-1 sequence that fits, LoRA (many fresh processes; its numbers
   are in ``session.log``).

On the device machine (the wheels come from ``../shared/tools/gpu_wheels.sh core``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
    python3 scripts/gpu_session.py --out $OUT --budget 540

``--only`` picks steps by name (e.g. a second, shorter call for what the first left).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int  # seconds this step may take at most
    min_seconds: int  # not started with less time than this left
    outputs: list[str] = field(default_factory=list)  # files under --out it writes
    requires: str = ""  # a module the step needs; skipped, and said so, where it is not installed


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    returncode: int | None = None
    reason: str = ""


def device_slug() -> str:
    """'h200' for 'NVIDIA H200', read from nvidia-smi so this process never holds a CUDA context."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "gpu"
    return name.split()[-1].lower() or "gpu"


def plan(out: Path, slug: str) -> list[Step]:
    pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    env_probe = (
        "import importlib, importlib.util, torch; "
        "print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability()); "
        "[print(n, getattr(importlib.import_module(n), '__version__', '?')) for n in "
        "('torch', 'triton', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate', 'gguf', 'liger_kernel')"
        " if importlib.util.find_spec(n)]"
    )
    return [
        Step("env", [PYTHON, "-c", env_probe], 60, 20),
        Step("gpu-tests", [*pytest, "-m", "gpu"], 200, 60),  # its report is in session.log
        Step("train-lora", [PYTHON, "scripts/bench_train.py", "--out", str(out / f"train-lora-{slug}.json")], 200, 90,
             [f"train-lora-{slug}.json"]),
        Step("train-qlora", [PYTHON, "scripts/bench_train.py", "--mode", "qlora",
                             "--out", str(out / f"train-qlora-{slug}.json")], 240, 120, [f"train-qlora-{slug}.json"]),
        Step("train-vlm-qlora", [PYTHON, "scripts/bench_train.py", "--model", "qwen2_vl", "--mode", "qlora",
                                 "--out", str(out / f"train-qlora-qwen2_vl-{slug}.json")], 300, 150,
             [f"train-qlora-qwen2_vl-{slug}.json"]),
        # DPO and GRPO steps through TRL (its numbers are in session.log: the device tool brings back 8 files)
        Step("rl", [PYTHON, "scripts/bench_rl.py", "--out", f"/tmp/rl-lora-{slug}.json"], 300, 150),
        # the LoRA step of Phi-4-mini's and Gemma-3-4B's dimensions (numbers in session.log, as for rl)
        Step("train-phi", [PYTHON, "scripts/bench_train.py", "--model", "phi3",
                           "--out", f"/tmp/train-lora-phi3-{slug}.json"], 200, 90),
        Step("train-gemma", [PYTHON, "scripts/bench_train.py", "--model", "gemma3_text",
                             "--out", f"/tmp/train-lora-gemma3_text-{slug}.json"], 200, 90),
        # torchrun with NCCL through the Trainer's DDP: our compiled kernels, checkpointing and save
        # under a launcher (its losses, process count and backend are printed to session.log)
        Step("ddp-nccl", [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "tests/distributed/sft_ddp.py", "--zoo", "llama", "--out", "/tmp/ddp-nccl",
                          "--per-device", "2", "--no-use-cpu"], 150, 60),
        Step("kernels", [PYTHON, "scripts/bench_kernels.py", "--quick", "--out", str(out / f"kernels-{slug}.json")],
             240, 90, [f"kernels-{slug}.json"]),
        Step("train-liger", [PYTHON, "scripts/bench_train.py", "--variants", "hf_liger",
                             "--out", str(out / f"train-lora-liger-{slug}.json")], 150, 90,
             [f"train-lora-liger-{slug}.json"]),
        # ours against Unsloth on the same model and batch (numbers in session.log: 8 files come back)
        Step("train-unsloth", [PYTHON, "scripts/bench_train.py", "--variants", "unsloth_like", "unsloth",
                               "--out", f"/tmp/train-lora-unsloth-{slug}.json"], 420, 240, requires="unsloth"),
        # not slow: the suite's slow test compiles every kernel for five GPU architectures (CI does it)
        Step("kernel-suite", [*pytest, "-x", "-m", "not slow", "tests/kernels"], 240, 60),
        Step("gguf-8b", [PYTHON, "scripts/bench_gguf.py", "--preset", "llama-3.1-8b", "--methods", "q4_k_m",
                         "--workdir", "/tmp", "--repeats", "1", "--out", str(out / f"gguf-export-{slug}.json")],
             420, 240,
             [f"gguf-export-{slug}.json"]),
        # The device tool brings back 8 files: this last, longest step prints its numbers to
        # session.log ("max seq N" per variant) and keeps its JSON on the machine.
        Step("max-seq", [PYTHON, "scripts/bench_train.py", "--max-seq",
                         "--out", f"/tmp/train-lora-maxseq-{slug}.json"], 420, 240),
    ]


def run_step(step: Step, timeout: float, log) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    env["PYTHONUNBUFFERED"] = "1"
    log.write(f"\n===== {step.name} (limit {timeout:.0f} s): {' '.join(step.argv)}\n")
    log.flush()
    started = time.monotonic()
    # The step's own process group, so a timeout also ends the subprocesses it started.
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return Outcome(step.name, "timed out", round(time.monotonic() - started, 1), None, f"over {timeout:.0f} s")
    status = "passed" if returncode == 0 else "failed"
    return Outcome(step.name, status, round(time.monotonic() - started, 1), returncode)


def _log_tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def write_summary(path: Path, outcomes: list[Outcome], slug: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"device": slug, "steps": [asdict(o) for o in outcomes]}, indent=1))
    partial.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the log, the summary and every result file")
    parser.add_argument("--budget", type=float, default=540, help="seconds this whole run may take")
    parser.add_argument("--only", nargs="+", help="run only these steps, in the usual order")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug()
    steps = plan(out, slug)
    unknown = sorted(set(args.only or ()) - {s.name for s in steps})
    if unknown:
        parser.error(f"unknown steps {unknown}; the steps are {[s.name for s in steps]}")
    if shutil.which("nvidia-smi") is None:
        print("warning: nvidia-smi not found; is this a GPU machine?", file=sys.stderr)
    outcomes: list[Outcome] = []
    with open(out / "session.log", "a") as log:
        for step in steps:
            if args.only and step.name not in args.only:
                continue
            left = deadline - time.monotonic() - 5  # 5 s to write the summary
            if step.requires and importlib.util.find_spec(step.requires) is None:
                outcomes.append(Outcome(step.name, "skipped", reason=f"{step.requires} is not installed"))
            elif left < step.min_seconds:
                outcomes.append(Outcome(step.name, "skipped", reason=f"{left:.0f} s left, needs {step.min_seconds}"))
            else:
                outcomes.append(run_step(step, min(step.timeout, left), log))
            o = outcomes[-1]
            print(f"{o.name:<13} {o.status:<10} {o.seconds:7.1f} s {o.reason}", flush=True)
            if o.status in ("failed", "timed out"):  # the caller may see only this process's output
                print(_log_tail(out / "session.log", 40), flush=True)
            write_summary(out / "session.json", outcomes, slug)
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
