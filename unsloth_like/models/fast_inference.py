"""Unsloth's fast-inference API on every model our loaders return: ``model.fast_generate``,
``model.save_lora`` and ``model.load_lora``, and ``from_pretrained(fast_inference=True,
max_lora_rank=..., gpu_memory_utilization=...)``.

Unsloth builds a vLLM engine that shares the model's weights; its GRPO notebooks sample with
``model.fast_generate(prompts, sampling_params=SamplingParams(...), lora_request=...)`` and read
``outputs[0].outputs[0].text``. Here the same calls run on transformers' ``generate``
(``models.sampling`` translates vLLM's sampling fields and builds vLLM-shaped outputs). The vLLM
engine is not built: ``fast_inference=True`` warns once that generation runs on transformers (and,
where vLLM is installed next to a CUDA GPU, that TRL's own ``GRPOConfig(use_vllm=True)`` is the way
to sample with it during training). Its options are still checked, and ``max_lora_rank`` is
enforced as vLLM would (a LoRA rank above it is refused).

LoRA semantics follow vLLM's, so the same code means the same thing on both paths:
``lora_request=None`` samples the base model (adapters disabled), and
``lora_request=model.load_lora(path)`` samples with the adapter saved at ``path`` (by
``model.save_lora(path)``), loaded next to the training adapter for the call and removed afterwards
(the training adapter stays active and trainable; nothing is left in the model's adapter list).
``load_lora(path, load_tensors=True)`` snapshots the adapter in memory instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import types
import weakref

import torch

from .sampling import RequestOutput, as_sampling_params, completion, generation_settings

logger = logging.getLogger(__name__)

VLLM_OPTIONS = {"max_lora_rank": 64, "gpu_memory_utilization": 0.5, "float8_kv_cache": False,
                "disable_log_stats": True, "unsloth_vllm_standby": False}  # Unsloth's defaults
_SETTINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # base model -> FastInference
_REQUEST_IDS = itertools.count(1)  # RequestOutput.request_id
_LORA_IDS = itertools.count(1)  # LoRARequest.lora_int_id (vLLM: from 1)
_GENERATE_BATCH = 16  # prompts per generate call


@dataclasses.dataclass(frozen=True)
class FastInference:
    """What ``from_pretrained`` was asked for: ``enabled`` is ``fast_inference``."""

    enabled: bool = False
    max_lora_rank: int = 64
    gpu_memory_utilization: float = 0.5


@dataclasses.dataclass
class LoRARequest:
    """vLLM's ``LoRARequest`` fields, plus the in-memory adapter of ``load_lora(load_tensors=True)``."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_tensors: dict | None = None
    lora_config: object = None


def pop_fast_inference_options(kwargs: dict) -> FastInference:
    """Take ``fast_inference`` and vLLM's options out of ``from_pretrained``'s keyword arguments
    (transformers would refuse them), checked; warns once when ``fast_inference=True``."""
    enabled = bool(kwargs.pop("fast_inference", False))
    options = {name: kwargs.pop(name, default) for name, default in VLLM_OPTIONS.items()}
    rank, memory = options["max_lora_rank"], options["gpu_memory_utilization"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"max_lora_rank must be a positive integer, got {rank!r}.")
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 < memory <= 1:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {memory!r}.")
    if enabled:
        _warn_no_engine_once(_vllm_usable())
    return FastInference(enabled, rank, float(memory))


def _vllm_usable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@functools.cache
def _warn_no_engine_once(vllm_usable: bool) -> None:
    if vllm_usable:
        logger.warning("fast_inference=True: this library does not build a weight-sharing vLLM engine; "
                       "model.fast_generate runs on transformers' generate. To sample with vLLM during GRPO, "
                       "set GRPOConfig(use_vllm=True) (TRL's colocate or server mode).")
    else:
        logger.warning("fast_inference=True without vLLM (or without a CUDA GPU): model.fast_generate, save_lora "
                       "and load_lora run on transformers' generate, with vLLM's sampling parameters and outputs.")


def attach_fast_inference(model, settings: FastInference | None = None):
    """Bind ``fast_generate`` / ``save_lora`` / ``load_lora`` to ``model`` (a base model or a
    ``PeftModel``); ``settings`` are recorded on its base model (a PeftModel finds them there).
    Returns the model."""
    if settings is not None:
        _SETTINGS[_base(model)] = settings
    for function in (fast_generate, save_lora, load_lora):
        setattr(model, function.__name__, types.MethodType(function, model))
    return model


def settings_of(model) -> FastInference:
    return _SETTINGS.get(_base(model), FastInference())


def check_lora_rank(model, rank: int) -> None:
    """vLLM refuses a LoRA above the engine's ``max_lora_rank``; so does a model loaded with
    ``fast_inference=True``, so that code moved to a vLLM machine does not fail there first."""
    settings = settings_of(model)
    if settings.enabled and rank > settings.max_lora_rank:
        raise ValueError(f"LoRA rank r={rank} exceeds max_lora_rank={settings.max_lora_rank} given to "
                         f"from_pretrained(fast_inference=True); load with max_lora_rank>={rank} or lower r.")


def _base(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _tokenizer(model):
    from .loader import tokenizer_of  # the loader imports this module

    tokenizer = tokenizer_of(model)
    if tokenizer is None:
        raise ValueError("fast_generate needs the model's tokenizer: load the model with "
                         "FastLanguageModel.from_pretrained.")
    return getattr(tokenizer, "tokenizer", tokenizer)


# --- fast_generate --------------------------------------------------------------------------------


def fast_generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm: bool = False, **kwargs):
    """vLLM's ``LLM.generate`` on transformers: ``prompts`` is a string, a ``{"prompt": ...}`` or
    ``{"prompt_token_ids": [...]}`` dict, or a list of them; ``sampling_params`` one
    ``SamplingParams`` (ours or vLLM's) or one per prompt. Returns one ``RequestOutput`` per prompt,
    in order. ``lora_request=None`` samples the base model (see the module docstring)."""
    unexpected = set(kwargs) - {"priority", "tokenization_kwargs"}
    if unexpected:
        raise TypeError(f"fast_generate got unexpected keyword argument(s) {sorted(unexpected)}.")
    tokenizer = _tokenizer(self)
    requests = _requests(prompts, tokenizer)
    params = _per_prompt(sampling_params, len(requests))
    outputs: list[RequestOutput | None] = [None] * len(requests)
    with _inference_mode(self), _lora_for(self, lora_request):  # the mode first: loading an adapter sets eval
        for group in _groups(params):  # prompts that share their sampling parameters generate together
            for start in range(0, len(group), _GENERATE_BATCH):
                chunk = group[start:start + _GENERATE_BATCH]
                for index, output in zip(chunk, _generate(self, tokenizer, [requests[i] for i in chunk],
                                                          params[chunk[0]])):
                    output.lora_request = lora_request
                    outputs[index] = output
    return outputs


def _requests(prompts, tokenizer) -> list[tuple[str | None, list[int]]]:
    """``(prompt text or None, prompt token ids)`` per prompt. Texts are tokenized as vLLM does (with
    the tokenizer's special tokens), except that a text already starting with BOS (a rendered chat
    template) does not get a second one."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    requests = []
    for prompt in prompts:
        if isinstance(prompt, dict):
            if "multi_modal_data" in prompt:
                raise ValueError("fast_generate with multi_modal_data (images) runs on vLLM only; call "
                                 "model.generate with the processor's inputs instead.")
            if "prompt_token_ids" in prompt:
                requests.append((prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]))
                continue
            if "prompt" not in prompt:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}.")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise TypeError(f"fast_generate takes strings or prompt dicts, got {type(prompt).__name__}.")
        bos = tokenizer.bos_token
        special = not (bos and prompt.startswith(bos))
        requests.append((prompt, tokenizer(prompt, add_special_tokens=special)["input_ids"]))
    if not requests:
        raise ValueError("fast_generate got no prompts.")
    return requests


def _per_prompt(sampling_params, count: int) -> list:
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != count:
            raise ValueError(f"fast_generate got {len(sampling_params)} sampling_params for {count} prompts; "
                             "give one, or one per prompt.")
        return [as_sampling_params(p) for p in sampling_params]
    return [as_sampling_params(sampling_params)] * count


def _groups(params: list) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for index, value in enumerate(params):
        groups.setdefault(id(value), []).append(index)
    return list(groups.values())


def _eos_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(_base(model), "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def _generate(model, tokenizer, requests, params) -> list[RequestOutput]:
    """One left-padded ``generate`` call for ``requests`` (seeded by ``params.seed`` when set)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(ids) for _, ids in requests)
    device = next(model.parameters()).device
    input_ids = torch.full((len(requests), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(requests), longest), dtype=torch.long)
    for row, (_, ids) in enumerate(requests):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    eos_ids = _eos_ids(model, tokenizer)
    settings = generation_settings(params, eos_ids, pad_id)
    if params.max_tokens is None:
        settings["max_new_tokens"] = max(1, getattr(_base(model), "max_seq_length", 2048) - longest)
    from transformers import GenerationConfig

    config = GenerationConfig(**{k: v for k, v in settings.items() if k != "stop_strings"},
                              stop_strings=settings.get("stop_strings"))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   generation_config=config, tokenizer=tokenizer if params.stop else None)
    generated = sequences[:, longest:].tolist()
    results = []
    for row, (prompt, ids) in enumerate(requests):
        completions = [completion(j, generated[row * params.n + j], params, set(eos_ids), tokenizer)
                       for j in range(params.n)]
        results.append(RequestOutput(str(next(_REQUEST_IDS)), prompt, list(ids), completions))
    return results


@contextlib.contextmanager
def _inference_mode(model):
    """Eval mode with the KV cache for the call (no autograd), then the model's own mode back."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    training, use_cache = model.training, getattr(text_config, "use_cache", True)
    model.eval()
    text_config.use_cache = True
    try:
        with torch.no_grad():  # not inference_mode: its tensors could not enter a later backward
            yield
    finally:
        text_config.use_cache = use_cache
        model.train(training)


# --- LoRA: save_lora, load_lora and the adapter a request names -----------------------------------


def save_lora(self, save_directory: str) -> None:
    """Save the active LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), as
    ``PeftModel.save_pretrained`` does; ``load_lora`` and ``FastLanguageModel.from_pretrained`` read it."""
    peft_model = _peft_model(self, "save_lora")
    peft_model.save_pretrained(save_directory, selected_adapters=[peft_model.active_adapter])


def load_lora(self, save_directory: str, load_tensors: bool = False, lora_request_id: int | None = None) -> LoRARequest:
    """A ``LoRARequest`` for ``fast_generate``: the adapter saved in ``save_directory``, or (with
    ``load_tensors=True``) a snapshot of the model's active adapter as it is now."""
    peft_model = _peft_model(self, "load_lora")
    request_id = lora_request_id if lora_request_id is not None else next(_LORA_IDS)
    if load_tensors:
        from peft import get_peft_model_state_dict

        name = peft_model.active_adapter
        tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        return LoRARequest(str(request_id), request_id, lora_tensors=tensors,
                           lora_config=dataclasses.replace(peft_model.peft_config[name], inference_mode=True))
    config_file = os.path.join(save_directory, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{save_directory} holds no LoRA adapter (no adapter_config.json); save one with "
                                "model.save_lora(path) first.")
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(save_directory)
    check_lora_rank(peft_model, getattr(config, "r", 0))
    return LoRARequest(str(request_id), request_id, lora_path=os.path.abspath(save_directory))


def _peft_model(model, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(f"{what} needs a model with LoRA adapters; call FastLanguageModel.get_peft_model first.")
    return model


@contextlib.contextmanager
def _lora_for(model, request):
    """The adapters ``request`` asks for, for the duration of one ``fast_generate`` call."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if request is not None:
            raise ValueError("lora_request needs a model with LoRA adapters (get_peft_model); this model has none.")
        yield
        return
    if request is None:
        with model.disable_adapter():
            yield
        return
    name = f"lora_request_{request.lora_int_id}"
    previous = model.active_adapter
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    _load_request(model, request, name)
    try:
        model.set_adapter(name)
        yield
    finally:
        model.set_adapter(previous)
        model.delete_adapter(name)
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(parameter_name, False))


def _load_request(model, request, name: str) -> None:
    path = getattr(request, "lora_path", "") or getattr(request, "lora_local_path", "")
    tensors = getattr(request, "lora_tensors", None)
    if tensors is not None:
        from peft import set_peft_model_state_dict

        model.add_adapter(name, request.lora_config)
        set_peft_model_state_dict(model, tensors, adapter_name=name)
    elif path:
        model.load_adapter(path, adapter_name=name, is_trainable=False)
    else:
        raise ValueError("lora_request names neither a saved adapter (lora_path) nor tensors; "
                         "make it with model.load_lora(path).")
