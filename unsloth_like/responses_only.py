"""``train_on_responses_only``: train on the assistant's replies only (labels -100 elsewhere).

Works on a TRL ``SFTTrainer`` after it has tokenized its datasets: a ``labels`` column is added
to ``trainer.train_dataset`` (and ``eval_dataset``), which TRL's collator uses as given.

Where the labels come from, best first:

1. The tokenizer's own assistant-token mask, when no markers are given, the dataset still has its
   conversations (TRL keeps the ``messages`` column) and the chat template marks replies with
   ``{% generation %}`` (all of ``unsloth_like.chat_templates`` do): the conversation is rendered
   again with ``return_assistant_tokens_mask=True`` and, when its tokens are the sample's (or
   start them: truncation), the mask is the labels. Exact, nothing to search for.
2. Otherwise, marker search over the token sequences of ``instruction_part`` / ``response_part``:
   a reply is everything after a response marker up to the next instruction marker (or the end of
   the packed sequence). When the parts are not given they are derived from the tokenizer's own
   chat template by rendering a probe conversation: the assistant header is what the template
   writes between a user turn and an assistant reply, the user header what it writes between a
   reply's end-of-turn and the next user turn. A marker may tokenize differently in context (a
   leading space or newline merging into the previous token); the search then tries the marker
   without its first token, then stripped.

Labels already in the dataset are kept where they mask (the result is the intersection). That is
how the exact route composes: with a template carrying ``{% generation %}`` markers (all of
``unsloth_like.chat_templates``), ``SFTConfig(assistant_only_loss=True)`` makes TRL build labels
from the tokenizer's own assistant-token mask, and this function then only checks them.

A sample whose labels would all be -100 (wrong markers, or the reply cut off by ``max_length``) is
an error naming the sample and the markers searched: Unsloth's most reported failure is training
on zero tokens without noticing. ``drop_fully_masked=True`` drops such samples instead, saying how
many.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
IGNORE_INDEX = -100
_PROBE = ("\u2063UNSLOTHLIKEUSER1\u2063", "\u2063UNSLOTHLIKEREPLY1\u2063", "\u2063UNSLOTHLIKEUSER2\u2063",
          "\u2063UNSLOTHLIKEREPLY2\u2063")


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            last_response_only: bool = False, drop_fully_masked: bool = False):
    """Mask everything but the assistant replies in ``trainer``'s datasets; returns ``trainer``.

    A trainer collating with ``UnslothVisionDataCollator`` (whose datasets hold conversations, not
    tokens) gets the masking switched on in its collator instead."""
    set_responses_only = getattr(getattr(trainer, "data_collator", None), "set_responses_only", None)
    if set_responses_only is not None:
        set_responses_only(instruction_part, response_part, last_response_only)
        return trainer
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    if (instruction_part is None) != (response_part is None):
        raise ValueError("Give both instruction_part and response_part, or neither (to derive them from the "
                         "tokenizer's chat template).")
    derived = instruction_part is None
    if derived:
        instruction_part, response_part = chat_template_parts(tokenizer)
    masker = _MarkerMasker(tokenizer, instruction_part, response_part, last_response_only)
    # Markers given by the caller are what the caller wants searched; derived ones defer to the
    # template's own mask where it has one.
    masker.template_masks = derived and bool(_GENERATION_TAG.search(getattr(tokenizer, "chat_template", None) or ""))
    trainer.train_dataset = _with_labels(trainer.train_dataset, masker, drop_fully_masked, "train_dataset")
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: _with_labels(v, masker, drop_fully_masked, f"eval_dataset[{k!r}]")
                                for k, v in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = _with_labels(trainer.eval_dataset, masker, drop_fully_masked, "eval_dataset")
    return trainer


def chat_template_parts(tokenizer) -> tuple[str, str]:
    """``(instruction_part, response_part)``: the user and assistant headers of the tokenizer's
    chat template, read off a rendered probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template to find the user/assistant markers in; pass "
                         "instruction_part= and response_part= (e.g. '<|im_start|>user\\n', '<|im_start|>assistant\\n').")
    user1, reply1, user2, reply2 = _PROBE

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    user_only = render([{"role": "user", "content": user1}])
    one_turn = render([{"role": "user", "content": user1}, {"role": "assistant", "content": reply1}])
    two_turns = render([{"role": "user", "content": user1}, {"role": "assistant", "content": reply1},
                        {"role": "user", "content": user2}, {"role": "assistant", "content": reply2}])
    # What the template writes after a user message by itself is the user's end of turn (ChatML
    # "<|im_end|>\n"), unless it already is the assistant cue (Mistral " [/INST]").
    response_part = _without_prefix(_between(two_turns, user1, reply1), _after(user_only, user1))
    # The reply's end-of-turn token belongs to the reply (the model must learn to stop): the
    # instruction marker starts after it.
    instruction_part = _without_prefix(_between(two_turns, reply1, user2), _after(one_turn, reply1).rstrip())
    if not response_part.strip() or not instruction_part.strip():
        raise ValueError("Could not find the user/assistant markers in the tokenizer's chat template; pass "
                         "instruction_part= and response_part=.")
    return instruction_part.lstrip("\n") or instruction_part, response_part


def _between(text: str, left: str, right: str) -> str:
    start = text.index(left) + len(left)
    return text[start:text.index(right, start)]


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker):]


def _without_prefix(text: str, prefix: str) -> str:
    """``text`` without ``prefix`` (and the newlines after it) when something is left."""
    if prefix and text.startswith(prefix) and text[len(prefix):].strip():
        return text[len(prefix):].lstrip("\n")
    return text


def response_masker(tokenizer, instruction_part: str, response_part: str, last_response_only: bool = False):
    """An object whose ``labels(input_ids)`` keeps the replies of one token sequence (marker search)
    and puts ``IGNORE_INDEX`` everywhere else."""
    return _MarkerMasker(tokenizer, instruction_part, response_part, last_response_only)


class _MarkerMasker:
    """Labels from marker token sequences (see the module docstring)."""

    def __init__(self, tokenizer, instruction_part: str, response_part: str, last_response_only: bool):
        self.tokenizer, self.template_masks = tokenizer, False
        self.instruction_part, self.response_part = instruction_part, response_part
        self.instruction = _candidates(tokenizer, instruction_part)
        self.response = _candidates(tokenizer, response_part)
        self.last_response_only = last_response_only

    def describe(self) -> str:
        return f"response_part={self.response_part!r}, instruction_part={self.instruction_part!r}"

    def labels(self, input_ids: list[int], seq_lengths: list[int] | None = None, messages=None) -> list[int]:
        mask = self._template_mask(input_ids, messages) if messages is not None and seq_lengths is None else None
        if mask is not None:
            labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]
            return _last_run(labels) if self.last_response_only else labels
        labels = [IGNORE_INDEX] * len(input_ids)
        bounds = _sequence_bounds(len(input_ids), seq_lengths)
        for start, end in bounds:
            spans = self._reply_spans(input_ids, start, end)
            if self.last_response_only:
                spans = spans[-1:]
            for first, last in spans:
                labels[first:last] = input_ids[first:last]
        return labels

    def _template_mask(self, input_ids, messages):
        """The chat template's assistant mask for ``messages`` when its tokens are ``input_ids``."""
        if not self.template_masks:
            return None
        try:
            rendered = self.tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True,
                                                          return_dict=True)
        except Exception:  # a conversation the template cannot render: search markers instead
            return None
        ids, mask = rendered["input_ids"], rendered["assistant_masks"]
        if ids[:len(input_ids)] != list(input_ids) or not any(mask):
            return None
        return mask[:len(input_ids)]

    def _reply_spans(self, ids, start, end):
        responses = _find_all(ids, self.response, start, end)
        instructions = _find_all(ids, self.instruction, start, end)
        spans = []
        for position, length in responses:
            reply_start = position + length
            stop = next((p for p, _ in instructions if p >= reply_start), end)
            if stop > reply_start:
                spans.append((reply_start, stop))
        return spans


def _last_run(labels: list[int]) -> list[int]:
    """Only the last contiguous run of unmasked labels (the final reply)."""
    end = max((i for i, t in enumerate(labels) if t != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [t if start <= i < end else IGNORE_INDEX for i, t in enumerate(labels)]


def _candidates(tokenizer, part: str) -> list[list[int]]:
    """Token sequences the marker may take in context, most specific first."""
    ids = tokenizer(part, add_special_tokens=False)["input_ids"]
    options = [ids]
    if len(ids) > 1:
        options.append(ids[1:])  # its first token merged into the previous text
    stripped = tokenizer(part.strip(), add_special_tokens=False)["input_ids"]
    if stripped and stripped not in options:
        options.append(stripped)
    return [o for o in options if o]


def _find_all(ids: list[int], candidates: list[list[int]], start: int, end: int) -> list[tuple[int, int]]:
    """Non-overlapping occurrences ``(position, length)`` of the first candidate that occurs."""
    for pattern in candidates:
        found, n, i = [], len(pattern), start
        while i + n <= end:
            if ids[i:i + n] == pattern:
                found.append((i, n))
                i += n
            else:
                i += 1
        if found:
            return found
    return []


def _sequence_bounds(length: int, seq_lengths: list[int] | None):
    if not seq_lengths:
        return [(0, length)]
    bounds, start = [], 0
    for n in seq_lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def _with_labels(dataset, masker: _MarkerMasker, drop_fully_masked: bool, name: str):
    if dataset is None:
        return None
    columns = dataset.column_names or []
    if "input_ids" not in columns:
        raise ValueError(f"{name} has no input_ids column (columns: {columns}); call train_on_responses_only "
                         "on an SFTTrainer, which tokenizes its datasets when it is created.")

    def add_labels(batch):
        result = []
        for i, ids in enumerate(batch["input_ids"]):
            labels = masker.labels(ids, batch["seq_lengths"][i] if "seq_lengths" in batch else None,
                                   batch["messages"][i] if "messages" in batch else None)
            existing = batch["labels"][i] if "labels" in batch else None
            if existing is not None:  # keep what was already masked (assistant_only_loss, completion masks)
                labels = [IGNORE_INDEX if old == IGNORE_INDEX else new for old, new in zip(existing, labels)]
            result.append(labels)
        return {"labels": result}

    labelled = dataset.map(add_labels, batched=True, desc=f"Masking non-responses in {name}")
    empty = [i for i, labels in enumerate(labelled["labels"]) if all(t == IGNORE_INDEX for t in labels)]
    if not empty:
        return labelled
    searched = masker.describe()
    if drop_fully_masked:
        logger.warning("train_on_responses_only: dropping %d of %d samples of %s with no reply token left (%s).",
                       len(empty), len(labelled), name, searched)
        keep = sorted(set(range(len(labelled))) - set(empty))
        return labelled.select(keep)
    raise ValueError(
        f"{len(empty)} of {len(labelled)} samples of {name} would train on no token at all (first: sample "
        f"{empty[0]}); searched {searched}. Pass the markers your chat template really writes (or fix the "
        "template), raise max_length if replies are cut off, or pass drop_fully_masked=True to drop them.")
