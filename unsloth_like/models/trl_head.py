"""Our per-token log-prob kernel under TRL's fused LM head, per model instance, on the CPU.

TRL's ``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer`` wrap the
model's ``forward`` in a fused LM head (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it runs the backbone and scores the labels through the LM head in tiles,
never building the (batch, seq, vocab) logits. On a GPU its tiles feed a Triton kernel over the
labelled positions; on a CPU they fall back to torch ops over 4096 x 32768 fp32 tiles and every
position (prompt and padding too). Our chunked ``kernels.token_log_probs`` over the labelled
positions only takes 0.39x the time and 0.22x the peak memory of a DPO step, 0.47x / 0.34x of a
GRPO step, at vocabulary 128K on CPU (``benchmarks/README.md``).

``take_over_fused_lm_head(trainer)`` runs after such a trainer is built (from the TRL hand-off
wrappers) and, for each model of the trainer that *we patched* and TRL wrapped, binds one more
instance ``forward``: a ``fused_lm_head=True`` call whose hidden states are on the CPU computes the
same ``FusedCausalLMOutput`` with our kernel (TRL's own settings: temperature, requested outputs,
final-logit softcap and logit scale, read from its wrapper); every other call (generation,
``fused_lm_head=False``, CUDA, ``cast_lm_head_to_fp32``, MoE router losses, heads sharded by
FSDP2 or partitioned by DeepSpeed ZeRO-3) goes to TRL's forward unchanged. Models we did not load
are never touched.
"""

from __future__ import annotations

import inspect
import logging
import os
import types

import torch

from ..kernels.token_logprobs import token_log_probs
from .patching import is_patched
from .sharding import is_shard, is_zero3_partitioned

logger = logging.getLogger(__name__)

_MARK = "_unsloth_like_token_log_probs"
# what TRL's wrapper closes over (trl.trainer.utils.add_fused_lm_head, TRL 1.16)
_TRL_SETTINGS = ("temperature", "outputs", "final_logit_softcapping", "logit_scale", "backbone_attr",
                 "cast_lm_head_to_fp32", "text_config")


def take_over_fused_lm_head(trainer) -> int:
    """Bind our fused-head forward on the trainer's models that we patched and TRL wrapped;
    returns how many were bound."""
    bound = 0
    for model in (getattr(trainer, "model", None), getattr(trainer, "ref_model", None)):
        if model is None:
            continue
        get_base = getattr(model, "get_base_model", None)
        bound += _take_over(get_base() if callable(get_base) else model)
    return bound


def _take_over(model) -> bool:
    forward = model.__dict__.get("forward")
    if forward is None or getattr(forward, _MARK, False) or not is_patched(model):
        return False
    function = getattr(forward, "__func__", None)
    code = getattr(function, "__code__", None)  # (functools.wraps gave it the model's forward's name)
    if code is None or code.co_name != "_fused_forward" or f"{os.sep}trl{os.sep}" not in code.co_filename:
        return False
    settings = inspect.getclosurevars(function).nonlocals
    if not set(_TRL_SETTINGS) <= settings.keys():
        logger.info("TRL's fused LM head has changed shape (%s); it runs as TRL wrote it.",
                    sorted(set(_TRL_SETTINGS) - settings.keys()))
        return False
    trl_forward = forward

    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        passed = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                      num_items_in_batch=num_items_in_batch)
        if not (fused_lm_head and _ours_applies(self, settings)):
            return trl_forward(*args, **passed, **kwargs)
        return _fused_on_cpu(self, settings, args, kwargs, labels, shift_labels, num_items_in_batch)

    fused_forward.__signature__ = inspect.signature(forward)
    bound_forward = types.MethodType(fused_forward, model)
    setattr(fused_forward, _MARK, True)
    model.forward = bound_forward
    return True


def _ours_applies(model, settings: dict) -> bool:
    """A CPU head in full precision, without the options our kernel leaves to TRL."""
    if settings["cast_lm_head_to_fp32"] or getattr(settings["text_config"], "output_router_logits", False):
        return False
    head = model.get_output_embeddings()
    # _parameters, not head.weight: under ZeRO-3 that read would start a gather of its own
    weight = head._parameters.get("weight") if isinstance(head, torch.nn.Module) else None
    return (isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
            and not is_shard(weight) and not is_zero3_partitioned(weight))  # TRL gathers those itself


def _fused_on_cpu(model, settings: dict, args, kwargs, labels, shift_labels, num_items_in_batch):
    """TRL's fused-head computation (its ``compact`` path: only labelled positions are scored) with
    ``token_log_probs`` in place of its tiled kernel."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    backbone_outputs = getattr(model, settings["backbone_attr"])(*args, **kwargs)
    if shift_labels is None:
        hidden_states, labels = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden_states, labels = backbone_outputs.last_hidden_state, shift_labels
    lm_head = model.get_output_embeddings()
    mask = labels != -100
    per_token = token_log_probs(hidden_states[mask], lm_head.weight, lm_head.bias, labels[mask],
                                temperature=settings["temperature"], softcap=settings["final_logit_softcapping"],
                                logit_scale=settings["logit_scale"],
                                outputs=tuple(name for name in settings["outputs"] if name != "log_probs"))
    # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero), as TRL does
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=None)
