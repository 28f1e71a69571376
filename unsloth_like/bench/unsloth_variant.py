"""The ``unsloth`` variant of the training-step benchmark: Unsloth itself, on the same weights, batch
and initial adapters as the other variants.

Unsloth rewrites transformers' and PEFT's classes when it is imported, so it runs in a process of
its own that imports it before anything else (``process_options``), and it only loads models
through its own ``FastLanguageModel.from_pretrained``. The other variants build their model in
memory; for Unsloth the benchmark first saves that same model (same seed, same vocabulary resize,
unquantised: a 4-bit run quantises it on load, as Unsloth loads any 16-bit checkpoint) with a
tokenizer into a temporary folder, in a process of its own so that the driver never holds the
model (``PeerCheckpoints``). The LoRA adapters the ``hf`` variant starts from are saved next to it
and copied into Unsloth's adapters after ``get_peft_model``: every variant then starts from the
same point, and their losses are comparable step by step.

On a GPU this is Unsloth's own kernels. On a CPU, Unsloth 2026.10 and newer trains through its CPU
backend (stock transformers + PEFT with a chunked loss, which ``turn_on_cpu_training_loss`` switches
on for the steps, as Unsloth's SFT trainer does for its own); older releases raise at import, and
the benchmark reports that error. Unsloth pins transformers <= 5.17: ``make bench-unsloth`` runs
every variant in a venv on its pins. The tests run this module against a stand-in for Unsloth with
the same call signatures (``tests/peer_fakes``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ADAPTER_FILE = "adapter_init.safetensors"
META_FILE = "peer-checkpoint.json"
# What decides the saved model: everything else in a spec (mode, batch, sequence) does not.
SHAPE_KEYS = ("device", "model", "size", "vocab")
# The process that runs the variant: Unsloth first, so that its patches land before transformers loads.
ENTRY = "import unsloth; from unsloth_like.bench.train_step import main; main()"


class PeerCheckpoints:
    """The saved starting points of the ``unsloth`` variant, one per model shape, in a temporary
    folder that is removed on exit (at Llama-3.1-8B's dimensions one is 16 GB)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self._saved: dict[tuple, Path] = {}

    def __enter__(self) -> PeerCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self._saved.clear()

    def for_spec(self, spec: dict) -> str:
        """The folder holding ``spec``'s model, saved by a fresh process on first use."""
        key = tuple(spec.get(name) for name in SHAPE_KEYS)
        if key not in self._saved:
            if self.root is None:
                self.root = Path(tempfile.mkdtemp(prefix="unsloth-like-peer-"))
            directory = self.root / f"checkpoint-{len(self._saved)}"
            done = subprocess.run([sys.executable, "-m", "unsloth_like.bench.unsloth_variant", json.dumps(spec),
                                   str(directory)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"saving the model for the unsloth variant failed:\n{done.stderr[-3000:]}")
            self._saved[key] = directory
        return str(self._saved[key])

    def process_options(self) -> tuple[list[str], dict]:
        """``(argv, subprocess options)`` of a process that runs one ``unsloth`` variant: Unsloth
        imported first, offline (the checkpoint is local), its compile cache in the temporary folder
        rather than in the caller's working directory."""
        if self.root is None:
            raise RuntimeError("PeerCheckpoints.for_spec must save the variant's model before it runs.")
        package_parent = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), package_parent]))
        env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
        return [sys.executable, "-c", ENTRY], {"cwd": self.root, "env": env}


def save_checkpoint(spec: dict, directory: Path) -> None:
    """Write ``spec``'s model as the other variants build it (unquantised), a tokenizer, the
    adapters the ``hf`` variant starts from, and what Unsloth's call needs (``META_FILE``)."""
    import transformers
    from safetensors.torch import save_file

    from ..testing import zoo
    from . import train_step

    model = train_step.build_base(spec, quantized=False)
    refuse_unloadable(model.config)
    directory.mkdir(parents=True)
    model.save_pretrained(directory)
    # Unsloth loads a tokenizer with every model; the batches are token ids, so the zoo's will do (on a
    # CPU from the folder the model was just loaded from, rather than building another zoo model).
    name = spec.get("model", "llama")
    source = train_step._cpu_zoo_spec(name, spec.get("size", "zoo")) if spec["device"] == "cpu" else name
    transformers.AutoTokenizer.from_pretrained(zoo.zoo_model_dir(source)).save_pretrained(directory)
    meta = {"dtype": str(model.dtype).removeprefix("torch."), **{name: spec.get(name) for name in SHAPE_KEYS}}
    # The hf variant's own adapter code, so that the copy is its starting point by construction.
    peft_model = train_step.add_adapters(model, {**spec, "variant": "hf", "mode": "lora",
                                                 "gradient_checkpointing": False})
    adapters = {name: tensor.detach().cpu().contiguous()
                for name, tensor in peft_model.state_dict().items() if ".lora_" in name}
    save_file(adapters, directory / ADAPTER_FILE)
    meta["target_modules"] = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters})
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


def refuse_unloadable(config) -> None:
    """Stop, in one sentence, when the saved model could not be loaded again: a ``--vocab`` below
    the tokenizer's special ids leaves ids that the reloaded embedding cannot hold."""
    vocab = config.get_text_config().vocab_size
    outside = {name: value for name in ("pad_token_id", "bos_token_id", "eos_token_id")
               if isinstance(value := getattr(config, name, None), int) and value >= vocab}
    if outside:
        name, value = max(outside.items(), key=lambda item: item[1])
        raise SystemExit(f"--vocab {vocab} is below the model's {name} {value}: the unsloth variant reloads the "
                         f"saved model, which needs it; use --vocab {value + 1} or more.")


def load_unsloth_model(spec: dict):
    """Unsloth's model for ``spec`` (LoRA, QLoRA or full finetuning) from the saved checkpoint, its
    adapters set to the other variants' starting values. Runs in the process ``ENTRY`` starts."""
    from safetensors.torch import load_file
    from unsloth import FastLanguageModel

    directory = Path(spec["checkpoint"])
    meta = json.loads((directory / META_FILE).read_text())
    checkpointing = "unsloth" if spec["gradient_checkpointing"] else False
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(directory), max_seq_length=spec["seq"], dtype=getattr(torch, meta["dtype"]),
        load_in_4bit=spec["mode"] == "qlora", full_finetuning=spec["mode"] == "full",
        use_gradient_checkpointing=checkpointing)
    if spec["mode"] == "qlora" and not any("4bit" in type(module).__name__ for module in model.modules()):
        raise RuntimeError("Unsloth loaded 16-bit weights for a QLoRA run (its CPU backend does so where "
                           "bitsandbytes' 4-bit fails), so this would not be a QLoRA measurement.")
    if spec["mode"] != "full":
        from .train_step import LORA

        model = FastLanguageModel.get_peft_model(
            model, **LORA, lora_dropout=0.0, bias="none", target_modules=meta["target_modules"],
            use_gradient_checkpointing=checkpointing, random_state=0)
        copy_adapters(model, load_file(directory / ADAPTER_FILE))
    import unsloth

    spec["unsloth"] = {"version": getattr(unsloth, "__version__", "unknown"),
                       "cpu_chunked_loss": spec["device"] == "cpu" and turn_on_cpu_training_loss(model)}
    return model


def turn_on_cpu_training_loss(model) -> bool:
    """Unsloth's CPU backend replaces the loss by a chunked one only during its SFT trainer's step,
    through a flag it sets on the model for that step. The benchmark's loop is that step, so the flag
    stays on for the run. Returns whether the model has that loss (an older or other backend may not)."""
    inner = getattr(model, "base_model", None)
    for candidate in (model, inner, getattr(inner, "model", None)):
        # vars(): PEFT forwards attribute reads to the wrapped model, not writes
        if candidate is not None and vars(candidate).get("_unsloth_cpu_chunked_ce", False):
            candidate._unsloth_cpu_chunked_ce_active = True
            return True
    return False


def copy_adapters(model, adapters: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s LoRA weights to ``adapters`` (same names, every one of them), or say why not."""
    params = dict(model.named_parameters())
    missing = sorted(set(adapters) - set(params))
    extra = sorted(name for name in params if ".lora_" in name and name not in adapters)
    if missing or extra:
        raise RuntimeError(
            f"Unsloth's LoRA adapters are not the ones the other variants start from ({len(missing)} missing, "
            f"e.g. {missing[:1]}; {len(extra)} extra, e.g. {extra[:1]}), so their losses would not be comparable.")
    with torch.no_grad():
        for name, tensor in adapters.items():
            params[name].copy_(tensor)


if __name__ == "__main__":  # python -m unsloth_like.bench.unsloth_variant SPEC_JSON DIRECTORY
    save_checkpoint(json.loads(sys.argv[1]), Path(sys.argv[2]))
