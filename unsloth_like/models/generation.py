"""``generate`` as Unsloth's notebooks call it, per model instance.

The notebooks write ``inputs = tokenizer.apply_chat_template(messages, tokenize=True,
add_generation_prompt=True, return_tensors="pt")`` and then ``model.generate(input_ids=inputs,
...)``. Before transformers 5 that call returned a tensor of token ids; transformers 5 returns a
``BatchEncoding`` (``input_ids`` and ``attention_mask``), which ``generate`` refuses as
``input_ids``. The models our loaders and ``get_peft_model`` return get an instance ``generate``
that, given an encoding as ``input_ids`` (or as the first positional argument), unpacks it as
``generate(**encoding)`` would: its ``attention_mask`` is used unless one is passed explicitly.
Any other call reaches the class's ``generate`` unchanged, streamers included.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

_MARK = "_unsloth_like_encoded_inputs"
_MARKS = "_unsloth_like_generate_wrappers"  # on a bound generate: the wrappers it holds


def accept_encoded_inputs(model):
    """Bind the encoding-aware ``generate`` to ``model`` (idempotent); returns the model."""
    return wrap_generate(model, _MARK, lambda self, args, kwargs: unpack_encoded_inputs(args, kwargs))


def wrap_generate(model, mark: str, prepare):
    """Bind a ``generate`` to ``model`` that passes its arguments through ``prepare(model, args,
    kwargs) -> (args, kwargs)`` and then to the generate it replaces (an earlier per-instance one,
    or the class's). Idempotent per ``mark``: a model already wrapped with it is returned as is."""
    current = model.__dict__.get("generate")
    marks = getattr(current, _MARKS, frozenset())
    if mark in marks:
        return model
    previous = current  # another per-instance generate (or None: the class's)

    def generate(self, *args, **kwargs):
        args, kwargs = prepare(self, args, kwargs)
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).generate(self, *args, **kwargs)

    setattr(generate, _MARKS, marks | {mark})
    model.generate = types.MethodType(generate, model)
    return model


def unpack_encoded_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with an encoding given as ``input_ids`` / ``inputs`` / first positional
    argument spread into keyword arguments; explicit keywords win over the encoding's entries."""
    if args and isinstance(args[0], Mapping):
        encoding, args = args[0], args[1:]
    elif isinstance(kwargs.get("input_ids"), Mapping):
        encoding = kwargs.pop("input_ids")
    elif isinstance(kwargs.get("inputs"), Mapping):
        encoding = kwargs.pop("inputs")
    else:
        return args, kwargs
    if "input_ids" not in encoding:
        raise ValueError(f"generate got a mapping without 'input_ids' (keys: {sorted(encoding)}); pass the "
                         "tokenizer's output, e.g. model.generate(**inputs) or model.generate(input_ids=inputs).")
    return args, {**dict(encoding), **kwargs}
