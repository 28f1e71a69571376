"""The CausalLM forward: fused linear cross-entropy in training, logits whenever they are wanted.

In training with labels (the model in train mode, grad enabled) the loss is computed from the
last hidden state and the lm_head weight by ``kernels.fused_linear_cross_entropy``: the
``(batch, seq, vocab)`` logits never exist, and ``outputs.logits`` is ``None``. The loss is
upstream's ``ForCausalLMLoss`` exactly: labels shifted left with ``ignore_index`` padding (or
``shift_labels`` taken as given), mean over non-ignored tokens, or the sum divided by
``num_items_in_batch`` when the trainer passes it (gradient-accumulation-correct).

Everywhere else the upstream class forward runs (with our patched layers underneath) and returns
real logits: in eval mode (``Trainer.evaluate``, ``compute_metrics``), in ``generate``, without
labels, under ``torch.no_grad()``, when the caller passes ``return_logits=True``, or when
``model.config.unsloth_return_logits`` is True. The fused loss uses the lm_head's weight directly
when it is a plain ``nn.Linear``, or PEFT's ``modules_to_save`` copy of one (the copy of the
active adapter, or the original when adapters are disabled: exactly what PEFT's wrapper would
call). An lm_head that is an FSDP2 unit, or part of one, is fused too (``sharding``: the loss
runs as the unit's forward where the weight is still a shard). Any other lm_head (LoRA on it,
trainable-token wrappers, hooks of anyone but FSDP2, DeepSpeed ZeRO-3 partitions) takes the
upstream path, so no adapter is ever skipped.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_linear_cross_entropy
from .sharding import call_as_forward, fsdp_unit, is_shard, is_zero3_partitioned, module_class, only_fsdp_hooks

logger = logging.getLogger(__name__)

RETURN_LOGITS_CONFIG_FLAG = "unsloth_return_logits"


def make_causal_lm_forward(upstream_forward, softcap_logits: bool = True):
    """A forward for one CausalLM (or ``*ForConditionalGeneration``) instance; ``upstream_forward``
    is its class's own forward, whose signature says how positional arguments map to names
    (a multimodal head's second parameter is ``pixel_values`` or ``attention_mask``, depending on
    the family). ``softcap_logits``: the upstream head applies ``final_logit_softcapping``."""
    signature = inspect.signature(upstream_forward)

    def causal_lm_forward(self, *args, return_logits=None, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        bound.pop(next(iter(signature.parameters)))  # self
        extra = bound.pop(_var_keyword(signature), {})
        labels = bound.get("labels")
        wants_logits = return_logits or getattr(self.config, RETURN_LOGITS_CONFIG_FLAG, False)
        lm_head = None
        if labels is not None and self.training and torch.is_grad_enabled() and not wants_logits:
            lm_head = _fusable_lm_head(self.lm_head)
        if lm_head is None:
            return upstream_forward(self, *args, **kwargs)
        return _fused_loss_forward(self, lm_head, {**bound, **extra}, softcap_logits)

    # generate() checks its inputs against the forward's signature: show upstream's (plus ours).
    causal_lm_forward.__signature__ = _with_return_logits(signature)
    return causal_lm_forward


def _with_return_logits(signature: inspect.Signature) -> inspect.Signature:
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    return signature.replace(parameters=[*parameters[:at], extra, *parameters[at:]])


def _var_keyword(signature: inspect.Signature) -> str | None:
    return next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)


def _fusable_lm_head(lm_head) -> nn.Linear | None:
    """The ``nn.Linear`` the lm_head's forward would run, or None when the loss must call the head."""
    inner = _modules_to_save_target(lm_head) if type(lm_head).__name__ == "ModulesToSaveWrapper" else lm_head
    reason = _head_blocker(lm_head, inner)
    if reason is None:
        return inner
    if not getattr(lm_head, "_unsloth_like_warned", False):
        logger.info("The loss uses full logits (upstream path): %s.", reason)
        lm_head._unsloth_like_warned = True
    return None


def _head_blocker(lm_head, inner) -> str | None:
    if inner is None or module_class(inner) is not nn.Linear:
        return f"lm_head is {type(lm_head).__name__}, not a plain nn.Linear"
    # Before any read of inner.weight: under ZeRO-3 that read would start a gather of its own.
    if any(is_zero3_partitioned(p) for p in inner._parameters.values()):
        return "DeepSpeed ZeRO-3 partitions the lm_head (its hooks gather it for the head's own forward)"
    if not only_fsdp_hooks(inner):  # FSDP2's own hooks only gather and free the weight
        return "forward hooks on the lm_head"
    if is_shard(inner.weight) and fsdp_unit(inner) is None:  # a unit's shard is gathered, see sharding
        return "the lm_head weight is a DTensor outside any FSDP2 unit (e.g. tensor parallel)"
    return None


def _modules_to_save_target(wrapper):
    """What PEFT's ``ModulesToSaveWrapper.forward`` calls (None when hooks may change that)."""
    if wrapper._forward_hooks or wrapper._forward_pre_hooks:  # e.g. adapter_names for a mixed batch
        return None
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(a not in wrapper._adapters for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _fused_loss_forward(self, lm_head, inputs: dict, softcap_logits: bool):
    """Upstream's head forward (``self.model(...)``, ``lm_head``, ``loss_function``) with the last
    two fused. Every input upstream hands to ``self.model`` is handed on; ``labels`` only where the
    inner model takes them (Gemma 3 builds its training attention mask from them)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = inputs.pop("labels")
    logits_to_keep = inputs.pop("logits_to_keep", 0)
    num_items_in_batch = inputs.pop("num_items_in_batch", None)
    shift_labels = inputs.pop("shift_labels", None)
    ignore_index = inputs.pop("ignore_index", -100)
    # No KV cache in a training forward: it would only cost memory, and transformers detects packed
    # sequences (per-sequence position_ids, no attention mask) only without one, so a packed batch
    # gets its block-diagonal mask here even when the caller did not pass use_cache=False.
    if inputs.get("use_cache") is None:
        inputs["use_cache"] = False
    if _takes_labels(type(self.model)):
        inputs["labels"] = labels
    outputs = self.model(**inputs)
    hidden = _keep_positions(outputs.last_hidden_state, logits_to_keep)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = _keep_positions(shift_labels.unsqueeze(-1), logits_to_keep).squeeze(-1)
    softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None) if softcap_logits else None

    def head_loss(hidden_rows, target):  # reads the weight when called: a shard until the unit gathers it
        return fused_linear_cross_entropy(hidden_rows, lm_head.weight, target, bias=lm_head.bias,
                                          ignore_index=ignore_index, softcap=softcap, reduction="mean",
                                          n_items=num_items_in_batch)

    unit = fsdp_unit(lm_head) if is_shard(lm_head.weight) else None
    loss = call_as_forward(unit, head_loss, hidden.reshape(-1, hidden.shape[-1]),
                           shift_labels.reshape(-1).to(hidden.device))
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


@functools.cache
def _takes_labels(module_class) -> bool:
    return "labels" in inspect.signature(module_class.forward).parameters


def _keep_positions(tensor: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Upstream's ``logits_to_keep`` slicing over the sequence dimension (0 keeps everything)."""
    if isinstance(logits_to_keep, int):
        return tensor if logits_to_keep == 0 else tensor[:, -logits_to_keep:, :]
    return tensor[:, logits_to_keep, :]
