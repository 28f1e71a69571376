"""``FastLanguageModel`` / ``FastModel``: Unsloth's loading API over plain transformers objects.

``from_pretrained`` returns ``(model, tokenizer)``: a transformers CausalLM (or a PEFT model when
``model_name`` is an adapter directory) patched per instance with our kernels where the
architecture is registered, and its tokenizer with a pad token. Arguments are checked before
anything heavy is loaded.

Pad token choice: a tokenizer without one gets, in order of preference, a reserved pad token it
already has (``<|finetune_right_pad_id|>``, ``<pad>``, ``<|pad|>``, ``<|endoftext|>`` when it is
not EOS), else its ``unk`` token, else a new ``<|pad|>`` special token (embeddings are resized
only if the tokenizer then outgrows them). EOS is never used as pad: a model trained with pad ==
EOS learns never to stop, because padded EOS positions are masked out of the loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from pathlib import Path

import torch

from ..chat_templates import stop_on_tokenizer_eos
from ..distributed import check_device_map, launch_device, sharded_launch
from ..env import is_bfloat16_supported
from ..rl_handoff import install_rl_keywords
from ..save.merged import attach_export_methods, attach_save_methods
from ..trainer import install_legacy_sft_keywords, install_precision_default
from .checkpointing import check_mode, set_gradient_checkpointing
from .fast_inference import attach_fast_inference, check_lora_rank, pop_fast_inference_options
from .generation import accept_encoded_inputs
from .lora import get_peft_model
from .nf4_cpu_guard import guard_4bit_layers
from .patching import patch_model, unpatch
from .vision_lora import decoder_layers_only, lora_target
from .vision import (check_vision_dependencies, is_vision_config, keep_unquantized_modules, load_processor,
                     mirror_special_tokens, prepare_vision_inputs)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<|PAD_TOKEN|>")
_UNSET = object()  # distinguishes "load_in_4bit left at its default" from an explicit True


class FastLanguageModel:
    """Load, patch and switch modes of causal language models (Unsloth's names and defaults); a
    vision-language checkpoint loads as ``FastVisionModel`` would load it."""

    patch_architecture = True  # FastModel leaves models unpatched
    vision_only = False  # FastVisionModel refuses text-only checkpoints

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit=_UNSET,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map="auto",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing="unsloth",
        resize_model_vocab: int | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ):
        return _load(
            cls, model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit, load_in_16bit=load_in_16bit, full_finetuning=full_finetuning, token=token,
            device_map=device_map, rope_scaling=rope_scaling, fix_tokenizer=fix_tokenizer,
            trust_remote_code=trust_remote_code, use_gradient_checkpointing=use_gradient_checkpointing,
            resize_model_vocab=resize_model_vocab, revision=revision, attn_implementation=attn_implementation,
            vision_only=cls.vision_only, **kwargs)

    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        """Add LoRA adapters; returns a ``peft.PeftModel`` (see ``unsloth_like.models.lora``). A
        vision-language model gets ``FastVisionModel.get_peft_model``'s module selection."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if is_vision_config(getattr(base, "config", None)):
            return FastVisionModel.get_peft_model(model, *args, **kwargs)
        return get_peft_model(model, *args, **kwargs)

    @staticmethod
    def for_inference(model):
        """Eval mode: logits are returned, ``generate`` uses the KV cache, and the tokenizer loaded
        with the model pads on the left (batched generation needs the prompts right-aligned)."""
        return _set_mode(model, training=False)

    @staticmethod
    def for_training(model):
        """Training mode again: the loss comes from the fused kernel, logits only on demand, and
        the tokenizer pads on the right."""
        return _set_mode(model, training=True)

    @staticmethod
    def unpatch(model):
        unpatch(model)
        return model


class FastModel(FastLanguageModel):
    """The generic path: any ``AutoModelForCausalLM`` checkpoint (or vision-language one, with its
    processor), loaded and left unpatched."""

    patch_architecture = False


class FastVisionModel(FastLanguageModel):
    """Vision-language models (Unsloth's names and defaults): ``from_pretrained`` returns the
    ``*ForConditionalGeneration`` model, its language decoder patched with our kernels where the
    family is registered, and its processor (which the notebooks call ``tokenizer``)."""

    vision_only = True

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", finetune_vision_layers: bool = True, finetune_language_layers: bool = True,
                       finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                       finetune_last_n_layers: int | None = None, layers_to_transform=None, **kwargs):
        """LoRA on the modules the ``finetune_*`` flags select (``models.vision_lora``); every other
        argument as ``FastLanguageModel.get_peft_model``. Returns a ``peft.PeftModel``."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        target = lora_target(base, vision=finetune_vision_layers, language=finetune_language_layers,
                             attention=finetune_attention_modules, mlp=finetune_mlp_modules,
                             target_modules=target_modules)
        if finetune_last_n_layers is not None or layers_to_transform is not None:
            target = decoder_layers_only(base, target, last_n=finetune_last_n_layers, layers=layers_to_transform)
        peft_model = get_peft_model(model, r=r, target_modules=target, lora_alpha=lora_alpha,
                                    lora_dropout=lora_dropout, bias=bias, **kwargs)
        return prepare_vision_inputs(peft_model)


def _load(cls, model_name, *, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning,
          token, device_map, rope_scaling, fix_tokenizer, trust_remote_code, use_gradient_checkpointing,
          resize_model_vocab, revision, attn_implementation, vision_only: bool = False, **kwargs):
    """``from_pretrained`` of every loader class: a text model with its tokenizer, or a
    vision-language model (any config with a vision tower) with its processor."""
    check_mode(use_gradient_checkpointing)
    fast_inference = pop_fast_inference_options(kwargs)
    auto_model, num_labels = _check_auto_model(kwargs.pop("auto_model", None), kwargs.pop("num_labels", None))
    user_quantization = kwargs.pop("quantization_config", None)
    quant = _resolve_quantization(load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning, user_quantization)
    check_max_seq_length(max_seq_length)
    device = _resolve_device(device_map)
    torch_dtype = _resolve_dtype(dtype, device)
    source = _resolve_source(model_name)  # raises before any weights are read

    import transformers

    adapter_dir = None
    if source.adapter:
        adapter_dir, model_name = source.path, source.base_model
    config = _load_config(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)
    vision = is_vision_config(config)
    if vision_only and not vision:
        raise ValueError(f"{model_name} is a text-only model ({type(config).__name__} has no vision tower); "
                         "load it with FastLanguageModel.from_pretrained.")
    if vision:
        check_vision_dependencies()
    if dtype is None:
        torch_dtype = _family_dtype(config, torch_dtype)
    _apply_rope_scaling(config, max_seq_length, rope_scaling)
    load_kwargs = {
        "config": config, "dtype": torch_dtype, "token": token, "revision": revision,
        "trust_remote_code": trust_remote_code,
        **kwargs,
    }
    if device != "cpu":
        load_kwargs["device_map"] = device_map if isinstance(device_map, dict) else {"": device}
    keep = keep_unquantized_modules(config, trust_remote_code) if vision else None  # None: transformers' own
    quantization_config = user_quantization or _quantization_config(quant, torch_dtype, keep)
    if quantization_config is not None:
        load_kwargs["quantization_config"] = quantization_config
    if num_labels is not None:
        config.num_labels = num_labels  # (with an explicit config, transformers ignores the keyword)
    auto = auto_model or (transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM)
    load_kwargs["attn_implementation"] = attn_implementation or default_attention(auto, config)
    model = auto.from_pretrained(model_name, **load_kwargs)
    source_dir = _tokenizer_source(adapter_dir, model_name)
    if vision:
        processor = load_processor(source_dir, token=token, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(
            source_dir, token=token, revision=revision, trust_remote_code=trust_remote_code)

    if fix_tokenizer:
        _ensure_pad_token(tokenizer, model)
        if vision:
            mirror_special_tokens(processor)
    if resize_model_vocab is not None:
        model.resize_token_embeddings(resize_model_vocab)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    model.max_seq_length = max_seq_length
    _TOKENIZERS[model] = processor
    guard_4bit_layers(model)  # right 4-bit maths where this CPU's bitsandbytes gets it wrong
    if cls.patch_architecture:
        patch_model(model)
    if full_finetuning:
        set_gradient_checkpointing(model, use_gradient_checkpointing)
    attach_export_methods(model)  # model.save_pretrained_gguf after a full finetune, or of the base
    attach_fast_inference(model, fast_inference)
    _generate_inputs(model, vision)
    if adapter_dir is not None:
        from peft import PeftModel

        model = attach_save_methods(PeftModel.from_pretrained(model, adapter_dir, is_trainable=True))
        check_lora_rank(model, model.peft_config[model.active_adapter].r)
        attach_fast_inference(model)
        _generate_inputs(model, vision)
        set_gradient_checkpointing(model, use_gradient_checkpointing)  # training continues from here
    install_legacy_sft_keywords()  # notebooks pass SFTTrainer(tokenizer=..., max_seq_length=...) next
    install_precision_default()  # ... and SFTConfig(...) without bf16/fp16, on T4s and CPUs too
    install_rl_keywords()  # ... or GRPOConfig(max_prompt_length=..., vllm_sampling_params=...), DPOTrainer(beta=...)
    return model, processor


def _generate_inputs(model, vision: bool) -> None:
    """``generate`` as the notebooks call it: ``input_ids=apply_chat_template(..., return_tensors=
    "pt")``; for a VLM also pixel dtype and the token-type ids its forward takes."""
    accept_encoded_inputs(model)
    if vision:
        prepare_vision_inputs(model)


# --- argument checks (all before anything is loaded) --------------------------------------------


class _Source:
    def __init__(self, path: str, adapter: bool = False, base_model: str | None = None):
        self.path, self.adapter, self.base_model = path, adapter, base_model


def _resolve_quantization(load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning, user_config=None) -> str:
    if user_config is not None:
        return _check_user_quantization(user_config, load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning)
    explicit_4bit = load_in_4bit is not _UNSET and bool(load_in_4bit)
    chosen = [name for name, on in (("load_in_4bit", explicit_4bit), ("load_in_8bit", load_in_8bit),
                                    ("load_in_16bit", load_in_16bit)) if on]
    if len(chosen) > 1:
        raise ValueError(f"Choose one of load_in_4bit / load_in_8bit / load_in_16bit, got {' and '.join(chosen)}.")
    if full_finetuning and (explicit_4bit or load_in_8bit):
        raise ValueError(
            f"full_finetuning=True trains every weight and cannot use {chosen[0]}=True; "
            "drop the quantisation flag or use LoRA (get_peft_model) on the quantised model.")
    if chosen:
        return {"load_in_4bit": "4bit", "load_in_8bit": "8bit", "load_in_16bit": "16bit"}[chosen[0]]
    if full_finetuning or load_in_4bit is not _UNSET:  # load_in_4bit=False given explicitly
        return "16bit"
    return "4bit"  # Unsloth's default


def _check_user_quantization(config, load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning) -> str:
    """A ``quantization_config`` passed by the user (e.g. ``BitsAndBytesConfig(...,
    bnb_4bit_quant_storage=torch.bfloat16)`` for FSDP) is used as given; flags that contradict it
    are refused rather than one of the two being silently ignored."""
    def flag(name: str) -> bool:  # a config object, or the dict form transformers also takes
        return bool(config.get(name, False) if isinstance(config, dict) else getattr(config, name, False))

    wants_4bit, wants_8bit = flag("load_in_4bit"), flag("load_in_8bit")
    kind = "4bit" if wants_4bit else "8bit" if wants_8bit else "other"
    contradictions = [given for given, on in (
        ("load_in_4bit=False", load_in_4bit is not _UNSET and not load_in_4bit and kind == "4bit"),
        ("load_in_4bit=True", load_in_4bit is not _UNSET and bool(load_in_4bit) and kind != "4bit"),
        ("load_in_8bit=True", load_in_8bit and kind != "8bit"),
        ("load_in_16bit=True", load_in_16bit),
        ("full_finetuning=True", full_finetuning),
    ) if on]
    if contradictions:
        raise ValueError(
            f"quantization_config ({type(config).__name__}, {kind}) contradicts {' and '.join(contradictions)}; "
            "pass the quantisation once: either the config or the load_in_* flag.")
    return kind


def _check_auto_model(auto_model, num_labels):
    """``auto_model=AutoModelForSequenceClassification, num_labels=1`` (a reward model, Unsloth's
    keywords): any transformers auto class, and a positive label count."""
    if auto_model is not None and not callable(getattr(auto_model, "from_pretrained", None)):
        raise ValueError(f"auto_model must be a transformers auto class such as AutoModelForSequenceClassification, "
                         f"got {auto_model!r}.")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    return auto_model, num_labels


def check_max_seq_length(max_seq_length) -> None:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}.")


def _resolve_device(device_map) -> str:
    if isinstance(device_map, str) and device_map not in ("auto", "cpu", "cuda") and not device_map.startswith("cuda:"):
        raise ValueError(f"device_map must be 'auto', 'cpu', 'cuda[:N]' or a dict, got {device_map!r}.")
    if device_map == "cpu":
        return "cpu"
    if isinstance(device_map, str) and device_map.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device_map={device_map!r} asks for CUDA, but no CUDA device is available.")
        return launch_device(device_map)
    check_device_map(device_map)
    return launch_device() if torch.cuda.is_available() else "cpu"  # under torchrun: cuda:LOCAL_RANK


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if is_bfloat16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}.")
    if device == "cpu" and dtype is torch.float16:
        raise ValueError("dtype=torch.float16 is not supported for training on CPU; use torch.float32 or torch.bfloat16.")
    if device != "cpu" and dtype is torch.bfloat16 and not is_bfloat16_supported():
        raise ValueError(f"{torch.cuda.get_device_name()} has no native bf16; use dtype=torch.float16 (or None).")
    return dtype


# Families whose activations overflow fp16 (Gemma 2's and 3's grow past 65504): on a GPU without bf16 the
# default dtype is fp32 for them, as Unsloth's float32 mixed precision does.
FP16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text")


def default_attention(auto, config) -> str:
    """SDPA, except eager for a model that soft-caps attention logits (Gemma 2), which SDPA cannot
    do, or whose class does not support SDPA. (transformers 5.24 refuses SDPA for Gemma 2; before,
    it accepted it and silently dropped the soft-cap.)"""
    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        return "eager"
    try:
        model_class = auto._model_mapping[type(config)]
    except (KeyError, AttributeError):  # remote code or a custom auto class: transformers decides
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"


def _family_dtype(config, default: torch.dtype) -> torch.dtype:
    """The default dtype (``dtype=None``) for this model: fp32 instead of fp16 for ``FP16_OVERFLOWS``."""
    if default is torch.float16 and config.model_type in FP16_OVERFLOWS:
        logger.warning("%s overflows in float16 and this GPU has no bfloat16: loading it in float32 (pass "
                       "dtype=torch.float16 to force half precision).", config.model_type)
        return torch.float32
    return default


def _resolve_source(model_name) -> _Source:
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name):
        raise ValueError(f"model_name must be a local directory or a Hub id, got {model_name!r}.")
    name = str(model_name)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if not looks_local:
        return _Source(name)  # a Hub id: from_pretrained reports network problems itself
    if not path.exists():
        raise FileNotFoundError(f"Model directory {path} does not exist; pass a local model directory or a Hub id.")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file; pass the directory that holds config.json.")
    if (path / "config.json").is_file():
        return _Source(str(path))
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config} names no base_model_name_or_path; load the base model, then the adapter.")
        return _Source(str(path), adapter=True, base_model=base)
    raise FileNotFoundError(f"{path} has no config.json (nor adapter_config.json); it is not a model directory.")


def _tokenizer_source(adapter_dir: str | None, model_name: str) -> str:
    """An adapter directory's own tokenizer when it saved one (Unsloth's notebooks do, e.g. with
    added tokens), else the base model's: ``PeftModel.save_pretrained`` alone writes none."""
    if adapter_dir is not None and any((Path(adapter_dir) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return adapter_dir
    return model_name


# --- configuration --------------------------------------------------------------------------------


def _load_config(model_name: str, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name, **kwargs)
    except OSError as error:
        raise OSError(
            f"Could not load {model_name!r}: it is not a local directory and the Hugging Face Hub did not "
            f"provide it ({str(error).splitlines()[0]}). Check the name and your network (HF_HUB_OFFLINE), "
            "or pass a local model directory."
        ) from error


def _apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None) -> None:
    """Extend the context the way HF configs express it (linear RoPE scaling, ceil factor)."""
    text = config.get_text_config()
    trained = getattr(text, "max_position_embeddings", None)
    if rope_scaling is None and (trained is None or max_seq_length <= trained):
        return
    parameters = dict(getattr(text, "rope_parameters", None) or {})
    if rope_scaling is not None:
        parameters.update(rope_scaling)
    else:
        factor = math.ceil(max_seq_length / trained)
        parameters.update({"rope_type": "linear", "factor": float(factor)})
        logger.info("max_seq_length %d > trained context %d: linear RoPE scaling, factor %d.",
                    max_seq_length, trained, factor)
    text.rope_parameters = parameters
    if trained is not None and max_seq_length > trained:
        text.max_position_embeddings = max_seq_length


def _quantization_config(quant: str, dtype: torch.dtype, keep_unquantized: list[str] | None):
    """bitsandbytes settings; ``keep_unquantized`` are module paths left in 16 bits (as patterns
    transformers' ``should_convert_module`` matches: a prefix at a module boundary), or None for
    transformers' default (the output embedding)."""
    if quant == "16bit":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_unquantized)
    storage = {}
    engine = sharded_launch()
    if engine is not None:  # bitsandbytes' default (uint8) cannot be sharded: accelerate keeps it whole everywhere
        storage = {"bnb_4bit_quant_storage": dtype}
        logger.info("%s launch: 4-bit weights stored as %s so that %s shards them.", engine, dtype, engine)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep_unquantized, **storage)


def _ensure_pad_token(tokenizer, model) -> None:
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    choice = next((t for t in _PAD_CANDIDATES if t in vocab and t != tokenizer.eos_token), None)
    if choice is None and tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        choice = tokenizer.unk_token
    if choice is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        tokenizer.pad_token = choice
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# The tokenizer (or processor) each loaded model came with, so for_inference/for_training can set its padding
# side (Unsloth's calls take only the model). Weak keys: the entry dies with the model.
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_of(model):
    """The tokenizer (or processor) ``model`` (or the base model of a PeftModel) was loaded with."""
    get_base = getattr(model, "get_base_model", None)
    return _TOKENIZERS.get(get_base() if callable(get_base) else model)


def _set_mode(model, training: bool):
    model.train(training)
    model.config.get_text_config().use_cache = not training
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    tokenizer = _TOKENIZERS.get(base)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's own tokenizer does the padding
    if tokenizer is not None:
        tokenizer.padding_side = "right" if training else "left"
        if not training and stop_on_tokenizer_eos(getattr(base, "generation_config", None), tokenizer):
            logger.info("generate now also stops at the tokenizer's EOS %r (set by get_chat_template).",
                        tokenizer.eos_token)
    return model
