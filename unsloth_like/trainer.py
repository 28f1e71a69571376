"""TRL hand-off: the legacy ``SFTTrainer`` keywords of Unsloth's notebooks, the precision default,
and ``UnslothTrainer``.

**Legacy keywords.** Unsloth's notebooks call ``SFTTrainer(model=…, tokenizer=…,
train_dataset=…, dataset_text_field="text", max_seq_length=…, packing=…, dataset_num_proc=…,
args=SFTConfig(…) or TrainingArguments(…))``. TRL ≥ 1.0 moved those keywords onto ``SFTConfig``
(``max_seq_length`` became ``max_length``, ``tokenizer`` became ``processing_class``) and rejects
them. ``install_legacy_sft_keywords()`` wraps ``trl.SFTTrainer.__init__`` once, in place: a call
*without* legacy keywords goes straight to TRL's own ``__init__`` with its arguments untouched;
a call with them gets them moved onto (a copy of) the config, then goes to TRL. It is installed by
``FastLanguageModel.from_pretrained`` (the first line of every notebook), never by ``import
unsloth_like``. This wrapper (with the one-BOS check below) and the precision default are the
process-wide changes the project makes to library classes (the TRL hand-off DESIGN.md allows),
each inert for calls that do not need it.

A legacy keyword that contradicts an explicit config value (``max_seq_length=2048`` with
``SFTConfig(max_length=512)``) raises instead of picking one; keywords TRL removed without a
replacement (``num_of_sequences``, ``chars_per_token``, ``dataset_batch_size``) raise too.
``SFTConfig(max_seq_length=N)`` itself (Unsloth's vision notebooks and tests write it) is taken as
``max_length=N`` by a wrapper of ``SFTConfig.__init__`` installed alongside.

**One BOS.** Chat templates such as Llama 3's render ``bos_token`` into the text, and TRL then
tokenizes a text dataset with the tokenizer's special tokens, so every example would start with
two BOS tokens. The same ``SFTTrainer.__init__`` wrapper looks at the first example of the train
and eval datasets (or at ``formatting_func``'s output for it): when the text starts with the BOS
token, the tokenizer adds BOS itself, and dropping the text's copy tokenizes exactly as the text
without special tokens would, it hands TRL the dataset with that leading BOS removed (a ``map``;
the user's dataset is not modified) and says so once in the log. Conversational datasets (TRL
renders and tokenizes them without adding special tokens), tokenizers that add no BOS (Qwen)
and texts without it go to TRL untouched.

**Precision default.** TRL's configs (``SFTConfig``, ``DPOConfig``, ``GRPOConfig``, ... all
derive from ``trl.trainer.base_config._BaseConfig``) default to ``bf16=True`` when the user sets
neither ``bf16`` nor ``fp16``, and transformers then refuses the config on every machine without
bf16: any CPU, Colab's T4. Unsloth's notebooks set neither. ``install_precision_default()`` wraps
``_BaseConfig.__post_init__`` once, in place: when neither flag was given it picks what the
hardware does, as Unsloth does: bf16 on a CUDA GPU that has it (TRL's own choice), fp16 mixed
precision on a CUDA GPU without it, full fp32 on the CPU (no CUDA, or ``use_cpu=True``); on other
accelerators (XPU, MPS, ...) TRL's default stays. A config with either flag given goes to TRL's
``__post_init__`` untouched. When fp16 was chosen (a GPU without bf16) and ``SFTTrainer`` gets a
model with bfloat16 weights, the wrapper above refuses it, saying what to load instead; for a
model whose activations overflow fp16 (Gemma 3) it trains in fp32 instead, on a config copy.
``transformers.TrainingArguments`` defaults both flags to ``False`` (fp32), which runs
everywhere; it is left alone. Installed by ``from_pretrained`` with the legacy keywords;
``uninstall_precision_default()`` restores TRL's function.

**Vision collator.** With ``data_collator=UnslothVisionDataCollator(...)`` the same wrapper gives
TRL a copy of the config with ``remove_unused_columns=False``, ``dataset_text_field=""`` and
``dataset_kwargs={"skip_prepare_dataset": True}``: the collator turns raw conversations and
images into batches, so TRL must neither tokenize the dataset nor drop its columns. The vision
notebooks set all three by hand; forgetting one fails in ways far from the cause. They also pass
a Python list of conversations as ``train_dataset``, which TRL refuses: it gets a dataset of row
numbers instead, which a copy of the collator resolves against the list.

**TRL's fused LM head.** After TRL's ``__init__`` returns, the same wrapper hands the trainer to
``models.trl_head.take_over_fused_lm_head``: on the models we patched (only those), TRL's fused LM
head then computes on the CPU with our ``kernels.token_log_probs``, output for output. Before
that, a trainer built under a launcher (``torchrun``) that set up fewer processes than were
started is refused with the fix (``distributed.check_trainer_processes``: on CPU,
``use_cpu=True``), where TRL would let each process train alone.

**UnslothTrainer** / **UnslothTrainingArguments(embedding_learning_rate=…)**: an ``SFTTrainer``
whose optimizer puts the trainable embedding and lm_head weights (``modules_to_save`` copies,
trainable-token deltas, or the weights themselves in full finetuning) in their own parameter
groups with that learning rate, as Unsloth's continued-pretraining notebooks expect.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging

from .distributed import check_trainer_processes
from .vision_collator import UnslothVisionDataCollator  # noqa: F401  (Unsloth's import path: unsloth.trainer)

logger = logging.getLogger(__name__)

# SFTTrainer keyword (TRL < 1.0, Unsloth notebooks) -> SFTConfig field
LEGACY_CONFIG_KEYWORDS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "dataset_kwargs": "dataset_kwargs",
    "neftune_noise_alpha": "neftune_noise_alpha",
}
REMOVED_KEYWORDS = ("num_of_sequences", "chars_per_token", "dataset_batch_size")
LEGACY_KEYWORDS = frozenset({"tokenizer", *LEGACY_CONFIG_KEYWORDS, *REMOVED_KEYWORDS})
_SHIM_MARK = "_unsloth_like_legacy_keywords"
EMBEDDING_PARAMETER_KEYS = ("embed_tokens", "lm_head", "wte", "token_adapter")


def install_legacy_sft_keywords() -> bool:
    """Let ``trl.SFTTrainer`` accept the legacy notebook keywords (idempotent; see the module
    docstring). Returns False when TRL is not installed."""
    try:
        import trl
    except ImportError:
        return False
    trainer_class = trl.SFTTrainer
    if getattr(trainer_class.__init__, _SHIM_MARK, False):
        return True
    original = trainer_class.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in LEGACY_KEYWORDS}
        try:
            bound = signature.bind_partial(self, *args, **kwargs)
        except TypeError:
            if legacy:
                raise
            return original(self, *args, **kwargs)  # a call TRL refuses: its own error
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        if legacy:
            arguments.update(translate_legacy_sft_keywords(arguments, legacy))
        check_chosen_precision(arguments.get("args"), arguments.get("model"))
        updates = fp32_for_fp16_overflows(arguments)
        arguments.update(updates)
        updates.update(vision_collator_settings(arguments))
        arguments.update(updates)
        updates.update(without_duplicate_bos(arguments))
        if not legacy and not updates:
            original(self, *args, **kwargs)  # nothing to do: TRL gets the call as it was made
        else:
            arguments.update(updates)
            original(self, **arguments)
        from .models.trl_head import take_over_fused_lm_head  # (models imports this module)

        check_trainer_processes(self)  # under torchrun on CPU without use_cpu=True: refused, not unsynced
        take_over_fused_lm_head(self)  # our patched models only: TRL's fused head with our CPU kernel

    setattr(__init__, _SHIM_MARK, True)
    trainer_class.__init__ = __init__
    _install_config_max_seq_length(trl.SFTConfig)
    return True


def _install_config_max_seq_length(config_class) -> None:
    """``SFTConfig(max_seq_length=N)`` (TRL < 1.0, Unsloth's vision notebooks and tests) as
    ``SFTConfig(max_length=N)``; calls without it reach TRL's ``__init__`` untouched."""
    if getattr(config_class.__init__, _SHIM_MARK, False):
        return
    original = config_class.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if "max_seq_length" in kwargs:
            value = kwargs.pop("max_seq_length")
            if "max_length" in kwargs and kwargs["max_length"] != value:
                raise ValueError(f"SFTConfig got max_seq_length={value!r} and max_length={kwargs['max_length']!r}; "
                                 "give it once, as max_length=.")
            kwargs["max_length"] = value
        original(self, *args, **kwargs)

    setattr(__init__, _SHIM_MARK, True)
    config_class.__init__ = __init__


def default_precision(use_cpu: bool = False) -> tuple[bool, bool] | None:
    """``(bf16, fp16)`` for a config that set neither, from this machine's hardware; None to keep
    TRL's default (an accelerator other than CUDA)."""
    import torch

    from .env import is_bfloat16_supported

    if not use_cpu and torch.cuda.is_available():
        return (True, False) if is_bfloat16_supported() else (False, True)
    if not use_cpu and _other_accelerator():
        return None
    return False, False


def _other_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def install_precision_default() -> bool:
    """Give TRL configs that set neither ``bf16`` nor ``fp16`` the precision this machine supports
    (idempotent; see the module docstring). Returns False when TRL is not installed."""
    try:
        from trl.trainer.base_config import _BaseConfig
    except ImportError:
        return False
    original = _BaseConfig.__post_init__
    if getattr(original, _SHIM_MARK, False):
        return True

    @functools.wraps(original)
    def __post_init__(self):
        if self.bf16 is None and not self.fp16:  # neither given: TRL would pick bf16 whatever the hardware
            chosen = default_precision(use_cpu=bool(getattr(self, "use_cpu", False)))
            if chosen is not None:
                self.bf16, self.fp16 = chosen
                self.__dict__[_CHOSEN_PRECISION] = chosen  # not a field: to_dict() and TRL never see it
                _log_precision_once(chosen)
        return original(self)

    setattr(__post_init__, _SHIM_MARK, True)
    _BaseConfig.__post_init__ = __post_init__
    return True


_CHOSEN_PRECISION = "_unsloth_like_chosen_precision"


def check_chosen_precision(config, model) -> None:
    """A config whose fp16 this hand-off chose (a GPU without bf16) cannot train a model whose
    weights are bfloat16: say what to load instead, before the trainer is built."""
    import torch

    if config is None or getattr(config, "__dict__", {}).get(_CHOSEN_PRECISION) != (False, True) or model is None:
        return
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ValueError("This GPU has no bf16, so training runs in fp16 mixed precision, but the model's weights "
                         "are bfloat16; load the model with dtype=None (float16 on this GPU) or dtype=torch.float16.")


def fp32_for_fp16_overflows(arguments: dict) -> dict:
    """Where this hand-off chose fp16 (a GPU without bf16) for a model whose activations overflow
    fp16 (Gemma 3; ``models.loader.FP16_OVERFLOWS``, which the loader already gives fp32 weights):
    a copy of the config in fp32, as Unsloth's float32 mixed precision does. A user's own
    ``fp16=True`` is left as given."""
    from .models.loader import FP16_OVERFLOWS

    config, model = arguments.get("args"), arguments.get("model")
    if config is None or getattr(config, "__dict__", {}).get(_CHOSEN_PRECISION) != (False, True) or model is None:
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FP16_OVERFLOWS:
        return {}
    logger.warning("%s overflows in float16 mixed precision: training in float32 on this GPU without bf16.", model_type)
    config = copy.copy(config)
    config.fp16 = False
    return {"args": config}


@functools.cache
def _log_precision_once(chosen: tuple[bool, bool]) -> None:
    name = {(True, False): "bf16 mixed precision", (False, True): "fp16 mixed precision (this GPU has no bf16)",
            (False, False): "fp32 (no CUDA GPU)"}[chosen]
    logger.info("TRL config without bf16/fp16: training in %s, as the hardware allows.", name)


def uninstall_precision_default() -> None:
    """Restore TRL's own ``_BaseConfig.__post_init__``."""
    from trl.trainer.base_config import _BaseConfig

    post_init = _BaseConfig.__post_init__
    if getattr(post_init, _SHIM_MARK, False):
        _BaseConfig.__post_init__ = post_init.__wrapped__


def uninstall_legacy_sft_keywords() -> None:
    """Restore TRL's own ``SFTTrainer.__init__`` and ``SFTConfig.__init__``."""
    import trl

    for owner in (trl.SFTTrainer, trl.SFTConfig):
        init = owner.__init__
        if getattr(init, _SHIM_MARK, False):
            owner.__init__ = init.__wrapped__


# What TRL must be told when the collator builds batches from raw conversations itself.
VISION_COLLATOR_SETTINGS = {"remove_unused_columns": False, "dataset_text_field": "",
                            "dataset_kwargs": {"skip_prepare_dataset": True}}


def vision_collator_settings(arguments: dict) -> dict:
    """With ``UnslothVisionDataCollator`` as ``data_collator``: a copy of the config with
    ``VISION_COLLATOR_SETTINGS`` (the notebooks set them by hand; forgetting one makes TRL drop the
    ``messages`` column or tokenize the dataset itself). Packing and padding-free batches cannot
    hold images and are refused. Empty for any other collator."""
    if not isinstance(arguments.get("data_collator"), UnslothVisionDataCollator):
        return {}
    config = _as_sft_config(arguments.get("args"), arguments.get("model"))
    for flag in ("packing", "padding_free"):
        if getattr(config, flag, False):
            raise ValueError(f"SFTConfig({flag}=True) cannot be used with UnslothVisionDataCollator: batches of "
                             f"images and conversations are built by the collator; set {flag}=False.")
    for name, value in VISION_COLLATOR_SETTINGS.items():
        setattr(config, name, copy.deepcopy(value) if name != "dataset_kwargs"
                else {**(config.dataset_kwargs or {}), **value})
    return {"args": config, **_index_python_lists(arguments)}


def _index_python_lists(arguments: dict) -> dict:
    """Python lists as datasets: TRL takes only ``datasets`` objects, and the notebooks build their
    training data as a list of conversations holding PIL images. Converting those to Arrow would
    re-encode every image; instead TRL gets a dataset of row numbers and the collator (a copy of
    the user's) looks each row up in the lists, so the images reach it as they were."""
    rows: list = []
    updates: dict = {}
    for name in ("train_dataset", "eval_dataset"):
        data = arguments.get(name)
        parts = data if isinstance(data, dict) else {None: data}
        for key, part in parts.items():
            if not isinstance(part, (list, tuple)):
                continue
            indexed = UnslothVisionDataCollator.row_dataset(range(len(rows), len(rows) + len(part)))
            rows.extend(part)
            if key is None:
                updates[name] = indexed
            else:
                updates.setdefault(name, dict(data))[key] = indexed
    if rows:
        updates["data_collator"] = arguments["data_collator"].with_rows(rows)
    return updates


def without_duplicate_bos(arguments: dict) -> dict:
    """The ``train_dataset`` / ``eval_dataset`` / ``formatting_func`` to give TRL instead, so that
    no example starts with two BOS tokens (see the module docstring); empty when nothing needs it."""
    from .chat_templates import bos_added_on_encode

    config = arguments.get("args")
    if (getattr(config, "dataset_kwargs", None) or {}).get("skip_prepare_dataset", False):
        return {}  # TRL does not tokenize these texts; whoever does decides about special tokens
    tokenizer = arguments.get("processing_class")
    bos = bos_added_on_encode(tokenizer) if callable(tokenizer) else None
    if not bos:
        return {}
    field = getattr(config, "dataset_text_field", None) or "text"
    formatting = arguments.get("formatting_func")
    parts = {}  # (argument name, key in a dict of eval datasets or None) -> dataset
    for name in ("train_dataset", "eval_dataset"):
        dataset = arguments.get(name)
        if isinstance(dataset, dict):
            parts.update({(name, key): part for key, part in dataset.items()})
        elif dataset is not None:
            parts[(name, None)] = dataset
    needing = {where for where, dataset in parts.items() if _needs_bos_removed(dataset, tokenizer, field, formatting)}
    if not needing:
        return {}
    _log_bos_once(bos)
    if formatting is not None:  # TRL formats every example with it: the texts come out of the wrapper
        return {"formatting_func": functools.partial(_format_without_bos, formatting, bos)}
    updates = {}
    for (name, key), dataset in parts.items():
        if (name, key) in needing:
            dataset = dataset.map(_strip_text_bos, fn_kwargs={"bos": bos, "field": field})
        if key is None:
            updates[name] = dataset
        else:
            updates.setdefault(name, {})[key] = dataset
    return updates


def _first_text(dataset, field: str, formatting):
    """The first example's training text, or None for conversational / pre-tokenised / empty data."""
    if "input_ids" in (getattr(dataset, "column_names", None) or []):
        return None
    try:
        example = next(iter(dataset))
    except (StopIteration, TypeError):
        return None
    if not isinstance(example, dict):
        return None
    text = formatting(example) if formatting is not None else example.get(field)
    return text if isinstance(text, str) else None


def _needs_bos_removed(dataset, tokenizer, field: str, formatting) -> bool:
    """The first example's text starts with BOS (which the tokenizer adds again), and removing the
    text's copy tokenizes as the text does without special tokens."""
    bos = tokenizer.bos_token
    text = _first_text(dataset, field, formatting)
    if text is None or not text.startswith(bos):
        return False
    if tokenizer(text[len(bos):])["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
        logger.warning("Examples start with the BOS token %r and the tokenizer adds another, but removing the "
                       "text's copy would change its tokenization; left as it is (render the text without BOS).", bos)
        return False
    return True


def _strip_text_bos(example: dict, bos: str, field: str) -> dict:
    text = example.get(field)
    if isinstance(text, str) and text.startswith(bos):
        example[field] = text[len(bos):]
    return example


def _format_without_bos(formatting, bos: str, example):
    text = formatting(example)
    return text[len(bos):] if isinstance(text, str) and text.startswith(bos) else text


@functools.cache
def _log_bos_once(bos: str) -> None:
    logger.warning("The training texts start with %r and the tokenizer adds it too: the text's copy is removed, "
                   "so each example starts with one BOS (as apply_chat_template(tokenize=True) gives).", bos)


def translate_legacy_sft_keywords(arguments: dict, legacy: dict) -> dict:
    """The SFTTrainer arguments that replace ``legacy`` keywords: ``processing_class`` and/or a
    copy of ``arguments["args"]`` as an ``SFTConfig`` with the config keywords set on it."""
    removed = sorted(set(REMOVED_KEYWORDS) & legacy.keys())
    if removed:
        raise ValueError(f"SFTTrainer keyword(s) {removed} no longer exist in TRL and have no replacement; "
                         "drop them (packing is configured with SFTConfig(packing=True, packing_strategy=...)).")
    updates = {}
    if "tokenizer" in legacy:
        updates["processing_class"] = processing_class_for(arguments, legacy["tokenizer"], "SFTTrainer")
    config_values = {LEGACY_CONFIG_KEYWORDS[k]: v for k, v in legacy.items() if k in LEGACY_CONFIG_KEYWORDS}
    if config_values:
        updates["args"] = _config_with(arguments.get("args"), arguments.get("model"), config_values, legacy)
    return updates


def processing_class_for(arguments: dict, tokenizer, trainer_name: str):
    """``tokenizer=`` (a trainer keyword before TRL 1.0) as ``processing_class``; a different
    ``processing_class`` given as well is refused."""
    given = arguments.get("processing_class")
    if given is not None and given is not tokenizer:
        raise ValueError(f"{trainer_name} got both tokenizer= and processing_class= with different objects; "
                         "pass the tokenizer once, as processing_class=.")
    return tokenizer


def _config_with(config, model, values: dict, legacy: dict):
    from trl import SFTConfig

    config = _as_sft_config(config, model)
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    for field_name, value in values.items():
        current = getattr(config, field_name)
        if current != defaults.get(field_name) and current != value:
            keyword = next(k for k, f in LEGACY_CONFIG_KEYWORDS.items() if f == field_name and k in legacy)
            raise ValueError(f"SFTTrainer got {keyword}={value!r} but its config sets {field_name}={current!r}; "
                             f"give the value once (on the config: {field_name}=...).")
        setattr(config, field_name, value)
    return config


def _as_sft_config(config, model):
    """A copy of ``config`` as an ``SFTConfig`` (TRL's own conversion of ``TrainingArguments``)."""
    import torch
    from transformers import TrainingArguments
    from trl import SFTConfig

    if config is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        cuda = torch.cuda.is_available()
        from .env import is_bfloat16_supported

        return SFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SFT",
                         bf16=cuda and is_bfloat16_supported(), use_cpu=not cuda)
    if isinstance(config, SFTConfig):
        return copy.copy(config)
    if isinstance(config, TrainingArguments):
        values = config.to_dict()
        values["hub_token"] = config.hub_token  # to_dict hides it
        fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
        return SFTConfig(**{k: v for k, v in values.items() if k in fields})
    raise TypeError(f"args must be an SFTConfig or TrainingArguments, got {type(config).__name__}.")


# --- UnslothTrainer -------------------------------------------------------------------------------


def _trainer_classes():
    from trl import SFTConfig, SFTTrainer

    @dataclasses.dataclass
    class UnslothTrainingArguments(SFTConfig):
        """``SFTConfig`` plus ``embedding_learning_rate``: the learning rate of the trainable
        embedding / lm_head weights (None: the same as everything else)."""

        embedding_learning_rate: float | None = dataclasses.field(
            default=None, metadata={"help": "Learning rate of trainable embed_tokens / lm_head weights."})

        def __post_init__(self):
            super().__post_init__()
            rate = self.embedding_learning_rate
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
                raise ValueError(f"embedding_learning_rate must be a positive number, got {rate!r}.")

    class UnslothTrainer(SFTTrainer):
        """``SFTTrainer`` with a separate learning rate for embeddings (see the module docstring)."""

        def create_optimizer(self, model=None):
            rate = getattr(self.args, "embedding_learning_rate", None)
            if rate is None or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            groups = embedding_parameter_groups(opt_model, self.get_decay_parameter_names(opt_model),
                                                self.args.weight_decay, rate)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

    for cls in (UnslothTrainingArguments, UnslothTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return UnslothTrainingArguments, UnslothTrainer


def embedding_parameter_groups(model, decay_names, weight_decay: float, embedding_learning_rate: float) -> list[dict]:
    """Optimizer groups: (decay, no decay) x (other weights, embedding weights at their own rate)."""
    groups = {key: [] for key in ((True, False), (False, False), (True, True), (False, True))}
    names = {True: [], False: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = any(key in name for key in EMBEDDING_PARAMETER_KEYS)
        groups[(name in decay_names, is_embedding)].append(param)
        names[is_embedding].append(name)
    if not names[True]:
        raise ValueError("embedding_learning_rate is set but no embedding or lm_head weight is trainable; "
                         "add modules_to_save=['embed_tokens', 'lm_head'] to get_peft_model (or drop the rate).")
    logger.info("embedding_learning_rate %.3g for %d tensors: %s", embedding_learning_rate, len(names[True]),
                ", ".join(names[True]))
    result = []
    for (decay, is_embedding), params in groups.items():
        if params:
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if is_embedding:
                group["lr"] = embedding_learning_rate
            result.append(group)
    return result


def __getattr__(name: str):
    # UnslothTrainer / UnslothTrainingArguments subclass TRL's classes: built on first use so that
    # importing this module does not import trl.
    if name in ("UnslothTrainer", "UnslothTrainingArguments"):
        arguments_class, trainer_class = _trainer_classes()
        globals().update(UnslothTrainingArguments=arguments_class, UnslothTrainer=trainer_class)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
