"""Run a script of tests/distributed in one plain process or under ``torchrun`` (gloo on CPU); what
such a script shares (``record_fusion``, ``leave``; the scripts import this file from their own
directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900


def run(script: str | Path, *args, nproc: int | None = None, env: dict | None = None,
        launcher: list[str] | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python script args`` (``nproc=None``) or ``torchrun --standalone --nproc_per_node N``
    (a free port of its own, so parallel test workers do not collide), or ``python <launcher>
    script args``; ``script`` is relative to this directory unless absolute. Raises with the
    output on failure. One thread per process: the ranks share the machine's cores."""
    if launcher is None:
        launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *launcher, str(HERE / script), *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
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


def record_fusion(model) -> dict:
    """Which paths the model takes, filled in by its first training forward: ``lora_fusion_report``
    for decoder layer 0 as seen inside its forward (where FSDP has gathered that layer's unit and
    ZeRO-3 its parameters), and ``"lm_head"``: ``"fused"`` when our fused loss ran (it returns no
    logits), ``"upstream"`` when the logits were made, ``"trl"`` for TRL's fused head (SFTTrainer's
    own forward wrapper; on a CPU it runs our log-prob kernel where the head is whole)."""
    from unsloth_like.models.patching import lora_fusion_report

    report: dict = {}
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model

    def layers(module, args):
        if not report:
            report.update({k: v for k, v in lora_fusion_report(model).items() if ".layers.0." in k})

    def head(module, args, output):
        if "lm_head" not in report and getattr(output, "loss", None) is not None:
            logits = getattr(output, "logits", "none: TRL's output")
            report["lm_head"] = "trl" if isinstance(logits, str) else "upstream" if logits is not None else "fused"

    causal_lm.model.layers[0].mlp.register_forward_pre_hook(layers)
    model.register_forward_hook(head)  # (older PEFT calls the causal LM's forward directly: no hooks there)
    return report
