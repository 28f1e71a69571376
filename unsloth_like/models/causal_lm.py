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
``model.config.unsloth_return_logits`` is True. An lm_head that is not a plain ``nn.Linear``
(e.g. a LoRA-adapted one) also takes the upstream path, so no adapter is ever skipped.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_linear_cross_entropy

logger = logging.getLogger(__name__)

RETURN_LOGITS_CONFIG_FLAG = "unsloth_return_logits"


def make_causal_lm_forward(upstream_forward):
    """A forward for one CausalLM instance; ``upstream_forward`` is its class's own forward."""

    def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, *args,
                          labels=None, logits_to_keep=0, return_logits=None, **kwargs):
        wants_logits = return_logits or getattr(self.config, RETURN_LOGITS_CONFIG_FLAG, False)
        fused = (labels is not None and self.training and torch.is_grad_enabled() and not wants_logits
                 and _fusable_lm_head(self.lm_head))
        if not fused:
            return upstream_forward(self, input_ids, attention_mask, position_ids, *args, labels=labels,
                                    logits_to_keep=logits_to_keep, **kwargs)
        return _fused_loss_forward(self, input_ids, attention_mask, position_ids, args, labels, logits_to_keep, kwargs)

    return causal_lm_forward


def _fusable_lm_head(lm_head) -> bool:
    if type(lm_head) is nn.Linear:
        return True
    if not getattr(lm_head, "_unsloth_like_warned", False):
        logger.info("lm_head is %s, not a plain nn.Linear: the loss uses full logits (upstream path).",
                    type(lm_head).__name__)
        lm_head._unsloth_like_warned = True
    return False


def _fused_loss_forward(self, input_ids, attention_mask, position_ids, args, labels, logits_to_keep, kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids, attention_mask, position_ids, *args, **kwargs)
    hidden = _keep_positions(outputs.last_hidden_state, logits_to_keep)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = _keep_positions(shift_labels.unsqueeze(-1), logits_to_keep).squeeze(-1)
    text_config = self.config.get_text_config()
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        self.lm_head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        bias=self.lm_head.bias,
        ignore_index=ignore_index,
        softcap=getattr(text_config, "final_logit_softcapping", None),
        reduction="mean",
        n_items=num_items_in_batch,
    )
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def _keep_positions(tensor: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Upstream's ``logits_to_keep`` slicing over the sequence dimension (0 keeps everything)."""
    if isinstance(logits_to_keep, int):
        return tensor if logits_to_keep == 0 else tensor[:, -logits_to_keep:, :]
    return tensor[:, logits_to_keep, :]
