"""``FastLanguageModel.get_peft_model``: Unsloth's LoRA call, returning a real ``peft.PeftModel``.

Every argument is checked against the model before PEFT touches it (rank, alpha, dropout, bias,
target modules and ``modules_to_save`` that exist, layer indices, LoftQ only on unquantised
loads); everything else goes to ``peft.LoraConfig`` itself, which rejects what it does not know,
so no option is silently ignored. Options the fused path cannot reproduce (dropout, DoRA,
``lora_bias``, …) still work: those layers run PEFT's modules (see ``lora_fusion``).

Adapters are initialised under ``random_state`` in a forked RNG: the same seed gives the same
adapters, and the caller's global RNG stream is left where it was.

4/8-bit bases (``prepare_model_for_kbit_training`` semantics, minus what is not needed): input
gradients are taken care of by the checkpointing (no ``enable_input_require_grads`` hook is
required), adapters are fp32 (PEFT's ``autocast_adapter_dtype``), and the norms compute in fp32
inside our RMSNorm kernel. An *unpatched* architecture gets its fp16 norm weights upcast to fp32,
as PEFT does, because its upstream norms may compute in the weights' dtype. Other base weights
keep their dtype: upcasting embeddings and lm_head to fp32, as PEFT's helper does, would cost
gigabytes for large vocabularies and buys nothing when they are frozen.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import re

import torch
from torch import nn

from ..save.merged import attach_save_methods
from .checkpointing import check_mode, set_gradient_checkpointing
from .fast_inference import attach_fast_inference, check_lora_rank
from .generation import accept_encoded_inputs
from .loftq import apply_loftq, check_loftq_config
from .nf4_cpu_guard import guard_4bit_layers
from .patching import is_patched, lora_fusion_report, patch_model, unpatch
from .phi3 import packed_target_modules

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BIAS_CHOICES = ("none", "all", "lora_only")
# LoraConfig fields that describe where an adapter came from, not what it is (ignored when
# comparing a second get_peft_model call with the adapter already there)
# comparing a second get_peft_model call with the adapter already there; how an adapter was
# initialised is not part of what it is either)
_NOT_COMPARED = {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "task_type",
                 "auto_mapping", "runtime_config", "init_lora_weights", "loftq_config"}


def get_peft_model(
    model,
    r: int = 16,
    target_modules=DEFAULT_TARGET_MODULES,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    layers_to_transform=None,
    layers_pattern=None,
    use_gradient_checkpointing="unsloth",
    random_state: int = 3407,
    max_seq_length: int | None = None,
    use_rslora: bool = False,
    modules_to_save=None,
    init_lora_weights=True,
    loftq_config=None,
    use_dora: bool = False,
    temporary_location: str | None = None,
    qat_scheme=None,
    **kwargs,
):
    """Add LoRA adapters to ``model`` and return the ``peft.PeftModel`` (see the module docstring).

    ``temporary_location`` is accepted for Unsloth notebook compatibility and has no effect: our
    saves write temporary files next to their destination. ``qat_scheme`` (quantisation-aware
    training) is not supported and refused.
    """
    from peft import PeftModel

    check_mode(use_gradient_checkpointing)
    if qat_scheme is not None:
        raise ValueError("qat_scheme (quantisation-aware training) is not supported; drop the argument.")
    if max_seq_length is not None:
        from .loader import check_max_seq_length  # loader imports this module

        check_max_seq_length(max_seq_length)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, nn.Module) or not hasattr(base, "config"):
        raise TypeError(f"get_peft_model needs a transformers model, got {type(model).__name__}.")
    target_modules = _check_arguments(base, r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform,
                                      modules_to_save, random_state)
    check_lora_rank(base, r)
    init_lora_weights, loftq_settings = _check_loftq(base, init_lora_weights, loftq_config)
    config = _lora_config(
        r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_rslora=use_rslora,
        modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
        use_dora=use_dora, task_type=kwargs.pop("task_type", _task_type(base)), **kwargs)

    if isinstance(model, PeftModel):
        _check_same_adapter(model, config)
        peft_model = model
    else:
        peft_model = _wrap(base, config, random_state)
        if loftq_settings is not None:
            _loftq(peft_model, loftq_settings)
        _prepare_quantized(base, is_patched(base))
        guard_4bit_layers(base)  # a model loaded without our loader: its unfused 4-bit layers too
    set_gradient_checkpointing(peft_model, use_gradient_checkpointing)
    if max_seq_length is not None:
        base.max_seq_length = max_seq_length
    if peft_model is not model:
        _log_fusion(peft_model)
    return attach_fast_inference(accept_encoded_inputs(attach_save_methods(peft_model)))


def _task_type(base) -> str:
    """PEFT's task for the model: a sequence classifier (a reward model) trains its ``score`` head
    in full (PEFT's ``modules_to_save`` for ``SEQ_CLS``), a language model is ``CAUSAL_LM``."""
    return "SEQ_CLS" if type(base).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def _wrap(base, config, random_state: int):
    """``peft.get_peft_model`` under a forked, seeded RNG; a patched model is re-patched on the
    wrapped model (PEFT may add modules, e.g. ``layer_replication``), or restored if PEFT fails."""
    import peft

    was_patched = is_patched(base)
    if was_patched:
        unpatch(base)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(random_state)
            peft_model = peft.get_peft_model(base, config)
    except BaseException:
        if was_patched:
            patch_model(base)
        raise
    if was_patched:
        patch_model(peft_model)
    return peft_model


def _loftq(peft_model, loftq_settings: dict) -> None:
    count = apply_loftq(peft_model, peft_model.active_adapter, loftq_settings)
    logger.info("LoftQ (%d-bit, %d iterations) initialised %d layers; their base weights now hold the "
                "dequantised values.", loftq_settings["loftq_bits"], loftq_settings["loftq_iter"], count)


# --- argument checks ------------------------------------------------------------------------------


def _check_arguments(model, r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform,
                     modules_to_save, random_state):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}.")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}.")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
    if bias not in _BIAS_CHOICES:
        raise ValueError(f"bias must be one of {_BIAS_CHOICES}, got {bias!r}.")
    if isinstance(random_state, bool) or not isinstance(random_state, int):
        raise ValueError(f"random_state must be an integer seed, got {random_state!r}.")
    names = [name for name, _ in model.named_modules() if name]
    target_modules = _check_target_modules(model, names, target_modules)
    if modules_to_save is not None:
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        missing = [m for m in modules_to_save if not any(_suffix_match(n, m) for n in names)]
        if missing:
            top = sorted({n.split(".")[-1] for n in names if "." not in n or n.count(".") <= 1})
            raise ValueError(f"modules_to_save names modules this model does not have: {missing}; "
                             f"candidates include {top}.")
    _check_layers(model, layers_to_transform)
    return target_modules


def _check_target_modules(model, names, target_modules):
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return target_modules
        if not any(re.fullmatch(target_modules, n) for n in names):
            raise ValueError(f"target_modules regex {target_modules!r} matches no module of this model; "
                             f"its linear layers are {_linear_names(model)}.")
        return target_modules
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be a list of module names, a regex or 'all-linear', got {target_modules!r}.")
    if not target_modules:
        raise ValueError("target_modules is empty; name at least one module (or pass 'all-linear').")
    target_modules = packed_target_modules(names, target_modules)  # Phi-3's qkv_proj / gate_up_proj
    missing = [t for t in target_modules if not any(_suffix_match(n, t) for n in names)]
    if missing:
        raise ValueError(f"target_modules names modules this model does not have: {sorted(missing)}; "
                         f"its linear layers are {_linear_names(model)}.")
    return list(target_modules)


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _linear_names(model) -> list[str]:
    linear = {n.split(".")[-1] for n, m in model.named_modules()
              if n and (isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt"))}
    return sorted(linear)


def _check_layers(model, layers_to_transform) -> None:
    if layers_to_transform is None:
        return
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {layers_to_transform!r}.")
    bad = [i for i in layers if i < 0 or (count is not None and i >= count)]
    if bad:
        raise ValueError(f"layers_to_transform has indices outside 0..{count - 1}: {bad}.")


def _check_loftq(model, init_lora_weights, loftq_config):
    """LoftQ runs here (``loftq.py``) after PEFT creates the adapters with its default init, so
    the config PEFT sees says ``init_lora_weights=True`` (which is also what PEFT documents for
    saving a LoftQ-initialised adapter). Returns ``(init for PEFT, loftq settings or None)``."""
    if loftq_config in (None, {}):  # Unsloth's notebooks pass {}
        loftq_config = None
    if init_lora_weights != "loftq":
        if loftq_config is not None:
            raise ValueError("loftq_config is only used with init_lora_weights='loftq'; pass both or neither.")
        return init_lora_weights, None
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("LoftQ initialises adapters from the 16-bit weights and quantises them itself; load the "
                         "model with load_in_4bit=False (and load_in_8bit=False) to use it.")
    settings = {"loftq_bits": 4, "loftq_iter": 1}
    if loftq_config is not None:
        settings.update(loftq_config if isinstance(loftq_config, dict) else dataclasses.asdict(loftq_config))
    check_loftq_config(settings)
    return True, settings


def _lora_config(**options):
    from peft import LoraConfig

    try:
        return LoraConfig(**options)
    except TypeError as error:
        accepted = sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init)
        raise TypeError(f"get_peft_model got an argument peft.LoraConfig does not accept ({error}); "
                        f"LoraConfig accepts {accepted}.") from None


def _check_same_adapter(model, config) -> None:
    """A second call on a PEFT model: same adapter settings -> no-op, different -> an error."""
    existing = model.peft_config.get(model.active_adapter)
    if existing is None:
        return
    ours, theirs = _comparable(config), _comparable(existing)
    differences = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)}
    if differences:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
        raise ValueError(
            f"This model already has a LoRA adapter {model.active_adapter!r} with different settings ({listed}). "
            "Load the base model again for a fresh adapter, or add a second one with "
            "model.add_adapter(name, peft.LoraConfig(...)).")
    logger.info("get_peft_model: the model already has this adapter; nothing to do.")


def _comparable(config) -> dict:
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_COMPARED}
    for key in ("target_modules", "modules_to_save"):
        if isinstance(values.get(key), (list, tuple, set)):
            values[key] = sorted(values[key])
    return values


# --- quantised bases ------------------------------------------------------------------------------


def _prepare_quantized(model, patched: bool) -> None:
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if not quantized or patched:
        return
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.dtype == torch.float16:
                    param.data = param.data.float()


def _log_fusion(peft_model) -> None:
    report = lora_fusion_report(peft_model)
    if not report:
        return
    fused = sum(state == "fused" for state in report.values())
    reasons = sorted({state for state in report.values() if state != "fused"})
    message = f"Fused LoRA path: {fused} of {len(report)} projection groups"
    if reasons:
        message += f"; PEFT's modules run for the others ({'; '.join(reasons)})"
    logger.info(message + ".")
