"""Saving from a distributed run (``torchrun`` / ``accelerate launch``): once, on rank 0.

Every rank of a DDP, FSDP2 or DeepSpeed run executes the user's script, so every rank calls
``model.save_pretrained_merged(...)``. Letting each write would race on the same directory; under
FSDP2 each rank also holds only shards of the parameters (``DTensor``), and under DeepSpeed ZeRO-3
only partitions (an empty local tensor outside a forward), which the merge cannot read.
``once_on_rank0(save)`` makes the call collective:

1. every rank takes part in gathering each partitioned parameter to a full tensor (a collective,
   in the same order everywhere); rank 0 keeps them, on the CPU, the others drop them at once;
2. rank 0 swaps the full tensors in for the partitions (every module that holds a parameter, so
   tied embeddings stay tied), runs the save, and swaps the partitions back;
3. the outcome (the paths written, or the error) is broadcast, so every rank returns the same
   value or raises, and none is left waiting.

Outside an initialised process group this is the plain call. (A group of one still gathers:
FSDP2 and ZeRO-3 hold their parameters as shards even on a single process.)
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..distributed import in_process_group
from ..models.sharding import is_shard, is_zero3_partitioned


def once_on_rank0(save):
    """``save(model, ...)`` run once, on rank 0, with full parameters (see the module docstring)."""

    @functools.wraps(save)
    def collective_save(model, *args, **kwargs):
        if not in_process_group():
            return save(model, *args, **kwargs)
        import torch.distributed as dist

        result, error = None, None
        with _full_parameters_on_rank0(model):
            if dist.get_rank() == 0:
                try:
                    result = save(model, *args, **kwargs)
                except Exception as exc:  # every rank must learn of it, or the others wait forever
                    error = exc
        outcome = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        result, message = outcome[0]
        if message is not None:
            raise RuntimeError(f"The save on rank 0 failed ({message}); nothing was written by this rank.")
        return result

    return collective_save


@contextlib.contextmanager
def _full_parameters_on_rank0(model: nn.Module):
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    partitioned: dict[int, nn.Parameter] = {}
    for module in model.modules():
        # .items(), not module.weight: under ZeRO-3 that access would start a gather on this rank alone
        for name, param in module._parameters.items():
            if _is_partitioned(param):
                holders.setdefault(id(param), []).append((module, name))
                partitioned[id(param)] = param
    full: dict[int, nn.Parameter] = {}
    for key, param in partitioned.items():  # the same order on every rank: module order
        with _gathered(param) as tensor:
            if rank0:
                full[key] = nn.Parameter(tensor.detach().to("cpu", copy=True), requires_grad=param.requires_grad)
    try:
        for key, replacement in full.items():
            for module, name in holders[key]:
                module._parameters[name] = replacement
        yield
    finally:
        for key in full:
            for module, name in holders[key]:
                module._parameters[name] = partitioned[key]


def _is_partitioned(param) -> bool:
    """An FSDP2 shard or a parameter DeepSpeed ZeRO-3 partitions (whatever its current status)."""
    return is_shard(param) or is_zero3_partitioned(param)


@contextlib.contextmanager
def _gathered(param):
    """The whole tensor of a partitioned parameter, gathered by every rank (a collective)."""
    if is_shard(param):
        with torch.no_grad():
            tensor = param.full_tensor()
        yield tensor
        del tensor
        return
    import deepspeed  # the parameter has ds_id: DeepSpeed partitioned it, so it is installed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield param.data
