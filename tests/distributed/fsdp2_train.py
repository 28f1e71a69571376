"""A few training steps of a zoo model under FSDP2 (``fully_shard``), or in one plain process.

Run by tests/distributed/test_fsdp2.py as ``torchrun --nproc_per_node 2 fsdp2_train.py ...`` (gloo
on CPU; Trainer cannot drive FSDP on CPU, so the loop is written here) and, for the reference,
as a plain ``python fsdp2_train.py ...`` (no process group, no sharding). Both take the same global
batch; each rank takes its contiguous share of the rows. The layout mirrors accelerate's FSDP2
plugin: each decoder layer is a unit, ``[final norm, lm_head]`` a unit that stays unsharded after
forward, then the root.

``--units modules`` also makes every LoRA adapter and the lm_head units of their own, so they
hold shards when the attention, MLP and loss read them: the fused paths must step aside there.

Rank 0 (or the single process) writes ``losses.json`` (the global loss per step), ``fusion.json``
(``launch.record_fusion``: the fused paths taken) and ``trainable.pt`` (every trainable
parameter, gathered to full tensors); then every rank calls the
save a user's script would call (the saves run once, on rank 0): ``save_pretrained_merged`` to
``merged/`` for LoRA and QLoRA, ``save_pretrained_gguf`` (F32) to ``gguf/`` for full finetuning.
``--mode qlora`` loads NF4 packed into float32 storage, as FSDP needs (see ``_quantization``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from launch import leave, record_fusion  # (this script's directory)

TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please.", "Name three rivers of Europe.",
         "The quick brown fox jumps over the lazy dog, twice over."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=("lora", "qlora", "full"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: a bf16 model under accelerate's bf16 mixed precision (--units accelerate)")
    parser.add_argument("--units", choices=("layers", "modules", "accelerate"), default="layers",
                        help="modules: every LoRA adapter and the lm_head are FSDP units of their own too; "
                             "accelerate: the units accelerate's FSDP2 plugin makes, made by accelerate itself")
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    out = Path(args.out)

    from unsloth_like import FastLanguageModel

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, full_finetuning=args.mode == "full",
                                                         use_gradient_checkpointing=False, dtype=dtype,
                                                         **_quantization(args.mode))
    if args.mode in ("lora", "qlora"):
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                                 use_gradient_checkpointing=False)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    n_items = int((batch["labels"][:, 1:] != -100).sum())  # the tokens the loss counts, all ranks together
    rows = len(TEXTS) // world
    local = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
    if distributed:
        model = _shard(model, world, args.units, args.precision)
    fusion = record_fusion(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # SGD, so that weights compare as gradients do: Adam's first steps are lr * g / |g| per element,
    # which turns the rounding of a near-zero gradient into a difference of up to a whole step.
    optimizer = torch.optim.SGD(trainable, lr=0.2)
    model.train()
    losses = []
    for _ in range(args.steps):
        # FSDP averages gradients over ranks: each rank divides its token sum by n_items / world,
        # so the average is the gradient of the global mean (what Trainer does with num_items_in_batch).
        loss = model(**local, num_items_in_batch=torch.tensor(n_items / world)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    trainable = {name: _full(p).detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "fusion.json").write_text(json.dumps(fusion))
        torch.save(trainable, out / "trainable.pt")
    if args.mode != "full":
        model.save_pretrained_merged(out / "merged", tokenizer, save_method="merged_16bit")
    else:
        model.save_pretrained_gguf(out / "gguf", tokenizer, quantization_method="f32")
    if distributed:
        leave()


def _quantization(mode: str) -> dict:
    """QLoRA as FSDP needs it: NF4 packed into the compute dtype's storage (``bnb_4bit_quant_storage``),
    so that the 4-bit weights are float tensors FSDP can shard like the others."""
    if mode != "qlora":
        return {"load_in_4bit": False}
    import transformers

    return {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
        llm_int8_skip_modules=["lm_head"])}


def _shard(model, world: int, units: str, precision: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if units == "accelerate":
        return _accelerate_fsdp2(model, precision)
    mesh = init_device_mesh("cpu", (world,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if units == "modules":  # as a wrap policy that makes each trainable module a unit would
        for name, module in base.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                fully_shard(module, mesh=mesh)
        fully_shard(base.lm_head, mesh=mesh)
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if units == "layers":
        fully_shard([base.model.norm, base.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def _accelerate_fsdp2(model, precision: str):
    """Shard as ``accelerate launch`` with ``fsdp_version: 2`` and a transformer-layer wrap policy
    does, through accelerate's own ``fsdp2_prepare_model`` (each decoder layer a unit; the input
    embedding a unit, or with tied embeddings part of the tail; ``[final norm, lm_head]`` a tail
    unit that stays unsharded after forward; the root).

    accelerate reaches its FSDP mode only from GPU states, so the Accelerator here is the CPU one
    (gloo, one per rank) with the FSDP2 plugin put where ``Accelerator(fsdp_plugin=...)`` keeps it
    on a GPU: only that branch of ``AcceleratorState`` is skipped, the wrapping code is accelerate's."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[type(base.model.layers[0]).__name__], reshard_after_forward=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    if precision == "bf16":  # what AcceleratorState does with the plugin on a GPU
        plugin.set_mixed_precision("bf16")
    accelerator.state.fsdp_plugin = plugin
    return fsdp2_prepare_model(accelerator, model)


def _full(param):
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


if __name__ == "__main__":
    main()
