"""Run a script of tests/distributed in one plain process or under ``torchrun`` (gloo on CPU), and
end a rank of such a script (``leave``; the scripts import this file from their own directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900


def run(script: str, *args, nproc: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python script args`` (``nproc=None``) or ``torchrun --standalone --nproc_per_node N``
    (a free port of its own, so parallel test workers do not collide); raises with the output on
    failure. One thread per process: the ranks share the machine's cores."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *launcher, str(HERE / script), *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=environment)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(f"{' '.join(command)} exited with {done.returncode}; error lines:\n"
                             + "\n".join(errors[-40:]) + f"\n--- stderr tail:\n{done.stderr[-6000:]}")
    return done


def leave() -> None:
    """End this rank of an initialised process group: after a barrier, exit without running gloo's
    teardown, which aborts now and then on torch 2.14 ("terminate called without an active
    exception", after all the work is done)."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
