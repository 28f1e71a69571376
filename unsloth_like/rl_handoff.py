"""TRL hand-off for the preference and RL trainers: the keywords Unsloth's GRPO / DPO / ORPO
notebooks still pass, on TRL 1.x.

Like the ``SFTTrainer`` shim (``trainer.py``), each wrapper is installed once, in place, by
``FastLanguageModel.from_pretrained``; a call without the keywords below reaches TRL's own
``__init__`` with its arguments untouched, and ``uninstall_rl_keywords()`` restores TRL's
functions.

**Configs** (``GRPOConfig``, ``RLOOConfig``, ``DPOConfig``, ``KTOConfig``, and ``ORPOConfig`` /
``CPOConfig`` from ``trl.experimental``):

- ``max_prompt_length=N``: TRL removed it (0.28 for GRPO, 0.29 for DPO) and no longer truncates
  prompts. The old keyword truncated only prompts longer than N, so it had no effect when every
  prompt fits: the value is kept on the config (not as a field; ``to_dict()`` does not show it)
  and the trainer checks, before it starts, that every prompt of its datasets is at most N tokens
  as TRL will tokenize it. A longer prompt is an error naming how many there are and how to filter
  them (the notebooks already filter their datasets to this bound).
- ``vllm_sampling_params=SamplingParams(...)`` (GRPO / RLOO; Unsloth's config field): its
  ``temperature``, ``top_p``, ``top_k`` (-1: none), ``min_p``, ``repetition_penalty`` and
  ``max_tokens`` become the config's ``temperature`` ... ``max_completion_length`` (a value that
  contradicts one given explicitly raises). ``stop`` strings must each be the tokenizer's EOS (TRL
  stops there anyway; transformers' generate can stop at tokens only), which the trainer checks.
  ``seed`` and ``include_stop_str_in_output`` change nothing TRL can use and are reported once in
  the log; ``n`` must be 1 (``num_generations`` is the config's).

**Trainers** (the same six): ``tokenizer=`` is ``processing_class=``; keywords that are fields of
the trainer's config (``DPOTrainer(beta=0.1, max_length=1024, ...)``, the pre-1.0 API) are set
on a copy of the config, and ``max_prompt_length=`` is kept as above. A keyword contradicting the
config raises rather than picking one. After TRL's ``__init__`` returns, the trainer goes to
``models.trl_head.take_over_fused_lm_head`` (as ``SFTTrainer``'s does): on the models we patched,
TRL's fused LM head computes on the CPU with our ``kernels.token_log_probs``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import logging
import warnings

from .distributed import check_trainer_processes
from .models.trl_head import take_over_fused_lm_head
from .trainer import _SHIM_MARK, processing_class_for

logger = logging.getLogger(__name__)

# (module, trainer class, config class)
RL_TRAINERS = (("trl", "GRPOTrainer", "GRPOConfig"), ("trl", "RLOOTrainer", "RLOOConfig"),
               ("trl", "DPOTrainer", "DPOConfig"), ("trl", "KTOTrainer", "KTOConfig"),
               ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
               ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"))
SAMPLING_TO_CONFIG = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                      "repetition_penalty": "repetition_penalty", "max_tokens": "max_completion_length"}
MAX_PROMPT_LENGTH = "_unsloth_like_max_prompt_length"
STOP_STRINGS = "_unsloth_like_stop_strings"


def install_rl_keywords() -> bool:
    """Wrap the RL configs' and trainers' ``__init__`` (idempotent); False without TRL."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    for trainer_class, config_class in _classes():
        _wrap(config_class, _config_init)
        _wrap(trainer_class, functools.partial(_trainer_init, config_class=config_class))
    return True


def uninstall_rl_keywords() -> None:
    """Restore TRL's own ``__init__`` of every class ``install_rl_keywords`` wrapped."""
    for trainer_class, config_class in _classes():
        for owner in (trainer_class, config_class):
            init = owner.__dict__.get("__init__")
            if getattr(init, _SHIM_MARK, False):
                owner.__init__ = init.__wrapped__


def _classes():
    for module_name, trainer_name, config_name in RL_TRAINERS:
        try:
            with warnings.catch_warnings():  # TRL warns on importing trl.experimental: we wrap, not use, it
                warnings.filterwarnings("ignore", message=".*trl.experimental")
                module = importlib.import_module(module_name)
        except ImportError:  # trl.experimental moves between releases
            continue
        trainer_class, config_class = getattr(module, trainer_name, None), getattr(module, config_name, None)
        if trainer_class is not None and config_class is not None:
            yield trainer_class, config_class


def _wrap(owner, make) -> None:
    original = owner.__dict__["__init__"]
    if getattr(original, _SHIM_MARK, False):
        return
    init = functools.wraps(original)(make(original))
    setattr(init, _SHIM_MARK, True)
    owner.__init__ = init


# --- configs --------------------------------------------------------------------------------------


def _config_init(original):
    def __init__(self, *args, **kwargs):
        max_prompt_length = kwargs.pop("max_prompt_length", None)
        if max_prompt_length is not None:
            _checked_length(max_prompt_length)
        sampling = kwargs.pop("vllm_sampling_params", None)
        stops = _take_sampling_params(sampling, kwargs, type(self).__name__) if sampling is not None else None
        original(self, *args, **kwargs)
        if max_prompt_length is not None:
            self.__dict__[MAX_PROMPT_LENGTH] = max_prompt_length
        if stops:
            self.__dict__[STOP_STRINGS] = stops
    return __init__


def _checked_length(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_prompt_length must be a positive integer, got {value!r}.")
    return value


def _take_sampling_params(sampling, kwargs: dict, config_name: str) -> list[str]:
    """Move ``vllm_sampling_params``' fields into ``kwargs``; returns its stop strings."""
    from .models.sampling import SamplingParams, as_sampling_params

    if config_name not in ("GRPOConfig", "RLOOConfig"):
        raise ValueError(f"{config_name} has no generation step: drop vllm_sampling_params.")
    params, defaults = as_sampling_params(sampling), SamplingParams()
    if params.n != 1:
        raise ValueError(f"vllm_sampling_params has n={params.n}; the completions per prompt are the config's "
                         "num_generations: set that instead.")
    for field, config_field in SAMPLING_TO_CONFIG.items():
        value = getattr(params, field)
        if value == getattr(defaults, field):
            continue  # vLLM's default: the config's own default stays
        value = max(value, 0) if field == "top_k" else value
        given = kwargs.get(config_field)
        if config_field in kwargs and given != value:
            raise ValueError(f"{config_name} got {config_field}={given!r} and vllm_sampling_params {field}={value!r}; "
                             f"give it once (on the config: {config_field}=...).")
        kwargs[config_field] = value
    ignored = [f"{name}={getattr(params, name)!r}" for name in ("seed", "include_stop_str_in_output")
               if getattr(params, name) != getattr(defaults, name)]
    if ignored:
        _log_ignored_once(", ".join(ignored))
    return list(params.stop)


@functools.cache
def _log_ignored_once(fields: str) -> None:
    logger.info("vllm_sampling_params %s: TRL samples with the trainer's seed and decodes completions itself, so "
                "these change nothing here.", fields)


# --- trainers -------------------------------------------------------------------------------------


def _trainer_init(original, config_class):
    signature = inspect.signature(original)
    config_fields = {f.name for f in dataclasses.fields(config_class) if f.init}

    def __init__(self, *args, **kwargs):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k not in signature.parameters
                  and (k in config_fields or k in ("tokenizer", "max_prompt_length"))}
        try:
            arguments = dict(signature.bind_partial(self, *args, **kwargs).arguments)
        except TypeError:
            if legacy:
                raise
            return original(self, *args, **kwargs)  # a call TRL refuses: its own error
        arguments.pop(next(iter(signature.parameters)))  # self
        if legacy:
            arguments.update(_translate(arguments, legacy, config_class))
        config = arguments.get("args")
        if config is not None and (MAX_PROMPT_LENGTH in config.__dict__ or STOP_STRINGS in config.__dict__):
            _check_before_training(config, arguments)
        if legacy:
            original(self, **arguments)
        else:
            original(self, *args, **kwargs)
        check_trainer_processes(self)  # under torchrun on CPU without use_cpu=True: refused, not unsynced
        take_over_fused_lm_head(self)  # our patched models only: TRL's fused head with our CPU kernel
    return __init__


def _translate(arguments: dict, legacy: dict, config_class) -> dict:
    updates = {}
    if "tokenizer" in legacy:
        trainer_name = config_class.__name__.removesuffix("Config") + "Trainer"
        updates["processing_class"] = processing_class_for(arguments, legacy.pop("tokenizer"), trainer_name)
    if not legacy:
        return updates
    config = arguments.get("args")
    config = copy.copy(config) if config is not None else _default_config(config_class, arguments.get("model"))
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.init}
    for name, value in legacy.items():
        if name == "max_prompt_length":
            config.__dict__[MAX_PROMPT_LENGTH] = _checked_length(value)
            continue
        current = getattr(config, name)
        if current != defaults.get(name) and current != value:
            raise ValueError(f"The trainer got {name}={value!r} but its config sets {name}={current!r}; give the "
                             f"value once (on the config: {name}=...).")
        setattr(config, name, value)
    updates["args"] = config
    return updates


def _default_config(config_class, model):
    """The config TRL would build for ``args=None`` (output directory named after the model)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    stem = config_class.__name__.removesuffix("Config")
    return config_class(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-{stem}")


def _check_before_training(config, arguments: dict) -> None:
    tokenizer = arguments.get("processing_class")
    if tokenizer is None:
        from .models.loader import tokenizer_of

        tokenizer = tokenizer_of(arguments.get("model"))
    if tokenizer is None:
        logger.warning("max_prompt_length / vllm_sampling_params were not checked: the trainer got no "
                       "processing_class and the model was not loaded by unsloth_like.")
        return
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    stops = [s for s in config.__dict__.get(STOP_STRINGS, []) if s != text_tokenizer.eos_token]
    if stops:
        raise ValueError(f"vllm_sampling_params stop={stops} cannot be honoured: TRL generates with transformers "
                         f"here, which stops at the EOS token {text_tokenizer.eos_token!r} only; drop them (or set "
                         "use_vllm=True with vLLM installed).")
    limit = config.__dict__.get(MAX_PROMPT_LENGTH)
    if limit is not None:
        for split in ("train_dataset", "eval_dataset"):
            data = arguments.get(split)
            for part_name, part in (data.items() if isinstance(data, dict) else [(split, data)]):
                if part is not None:
                    check_prompt_lengths(part, tokenizer, limit, part_name)


def check_prompt_lengths(dataset, tokenizer, limit: int, name: str = "train_dataset") -> None:
    """Every ``prompt`` of ``dataset``, tokenized as TRL tokenizes it (chat template with the
    generation prompt for conversations; the tokenizer's special tokens for text), is at most
    ``limit`` tokens; otherwise one error saying how many are longer and how to drop them."""
    columns = getattr(dataset, "column_names", None) or []
    if "prompt" not in columns:
        logger.warning("max_prompt_length=%d was not checked on %s: it has no 'prompt' column (implicit prompts).",
                       limit, name)
        return
    lengths = [_prompt_length(prompt, tokenizer) for prompt in dataset["prompt"]]
    too_long = [i for i, length in enumerate(lengths) if length > limit]
    if too_long:
        longest = max(too_long, key=lambda i: lengths[i])
        # (apply_chat_template returns a dict on transformers 5: the ids are its "input_ids")
        count = ("tokenizer(row['prompt'])['input_ids']" if isinstance(dataset["prompt"][longest], str) else
                 "tokenizer.apply_chat_template(row['prompt'], add_generation_prompt=True, return_dict=True)['input_ids']")
        raise ValueError(
            f"{len(too_long)} of {len(lengths)} prompts in {name} are longer than max_prompt_length={limit} tokens "
            f"(longest: row {longest}, {lengths[longest]} tokens), and TRL no longer truncates prompts: filter them "
            f"out first, e.g. {name}.filter(lambda row: len({count}) <= {limit}), or raise max_prompt_length.")


def _prompt_length(prompt, tokenizer) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(text=prompt)["input_ids"])
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = encoded["input_ids"]
    return len(ids[0] if ids and isinstance(ids[0], list) else ids)
