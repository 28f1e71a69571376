"""Running under a launcher (``torchrun``, ``accelerate launch``): one process per device.

We do not write a distributed engine; PyTorch DDP / FSDP2 (through the Trainer, accelerate or a
hand-written loop) do the work. What our side must get right:

* **Placement.** Each process loads its own copy on its own GPU: ``from_pretrained``'s default
  ``device_map="auto"`` means ``cuda:LOCAL_RANK`` there (``launch_device``), and a device map that
  spreads one model over several GPUs is refused (``check_device_map``): it cannot be combined
  with one process per GPU.
* **No silent single-process training.** On a machine without a GPU, transformers' Trainer only
  joins the launcher's processes when told ``use_cpu=True``; without it every process trains
  alone on the whole dataset and nothing says so (accelerate's "no backend, no distributed
  training"). ``check_trainer_processes`` refuses that, with the fix, when a trainer is built.
* **Checkpointing DDP accepts.** Our offloaded checkpoint recomputes a layer inside backward
  (reentrant), which DDP refuses ("marked a variable ready twice"); in a multi-process run
  ``models.checkpointing`` uses torch's non-reentrant checkpoint instead (``multi_process``).
* **4-bit weights that shard.** Under an FSDP or ZeRO-3 launch (``sharded_launch``) the loader
  stores NF4 in the compute dtype (``bnb_4bit_quant_storage``), the storage those engines can
  split; with bitsandbytes' default (uint8) accelerate leaves them whole on every GPU.
* **Saving once**: ``save.distributed``.

The launcher's own environment (``WORLD_SIZE``, ``LOCAL_RANK``) is read, as torch and accelerate
read it; nothing of ours is set.
"""

from __future__ import annotations

import os


def in_process_group() -> bool:
    """Whether this process belongs to an initialised process group (of any size: FSDP2 and ZeRO-3
    split parameters even on one process, e.g. ``torchrun --nproc_per_node 1``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def multi_process() -> bool:
    """Whether this process is one of several in an initialised process group."""
    import torch.distributed as dist

    return in_process_group() and dist.get_world_size() > 1


def launched_processes() -> int:
    """How many processes the launcher started (1 outside a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launch_device(cuda: str = "cuda") -> str:
    """The GPU of this process: ``cuda:LOCAL_RANK`` under a launcher, else ``cuda``."""
    local_rank = os.environ.get("LOCAL_RANK")
    if launched_processes() > 1 and local_rank is not None and cuda == "cuda":
        return f"cuda:{int(local_rank)}"
    return cuda


def check_device_map(device_map) -> None:
    """Refuse a device map that spreads one model over several devices in a multi-process launch."""
    if launched_processes() <= 1 or not isinstance(device_map, dict):
        return
    devices = {str(d) for d in device_map.values()}
    if len(devices) > 1:
        raise ValueError(
            f"device_map places this model on {sorted(devices)}, but this process is one of "
            f"{launched_processes()} started by a launcher (WORLD_SIZE): each process trains its own copy on "
            "its own GPU; drop device_map and each copy goes to cuda:LOCAL_RANK.")


def sharded_launch() -> str | None:
    """The engine that will shard the parameters across processes, when the launcher says so:
    ``accelerate launch`` with an FSDP config, or a DeepSpeed config at ZeRO stage 3, tells every
    process in its environment. None otherwise (one process, DDP, ZeRO-1/2, a plain torchrun)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "DeepSpeed ZeRO-3"
    return None


def check_trainer_processes(trainer) -> None:
    """Refuse a trainer that set up fewer processes than the launcher started (see the module
    docstring): every process would train alone, unsynchronised."""
    launched = launched_processes()
    accelerator = getattr(trainer, "accelerator", None)
    joined = getattr(accelerator, "num_processes", launched)
    if launched > 1 and joined != launched:
        raise RuntimeError(
            f"This script was started as {launched} processes (WORLD_SIZE={launched}), but the trainer set up "
            f"{joined}: each process would train alone on the whole dataset. On a machine without a GPU pass "
            "use_cpu=True in the trainer's config (e.g. SFTConfig(use_cpu=True, ...)) so the processes train "
            "together over gloo.")
