"""Which linear layers of a vision-language model get LoRA: Unsloth's ``finetune_*`` flags.

``FastVisionModel.get_peft_model(finetune_vision_layers=, finetune_language_layers=,
finetune_attention_modules=, finetune_mlp_modules=)`` selects modules as Unsloth does:

* linear layers (``nn.Linear`` and bitsandbytes' subclasses) whose leaf name occurs more than
  once in the model when no ``target_modules`` are given, which leaves out one-off heads and
  projectors (``lm_head``, mllama's ``multi_modal_projector``, the Qwen mergers' ``mlp.0/2``);
* whose path has a model-part word (vision: ``vision``, ``image``, ``visual``, ``patch``;
  language: ``language``, ``text``) followed, later in the path, by a component word (attention:
  ``self_attn``, ``attention``, ``attn``, ``mixer``; MLP: ``mlp``, ``feed_forward``, ``ffn``,
  ``dense``, ``mixer``), anywhere inside path components (so mllama's ``cross_attn`` counts as
  attention); a text-only decoder (``model.layers.N.<component>.<leaf>``) counts as language.
  When no path has a model-part word, the component rule alone decides.

Unsloth hands PEFT its selection as one regex that can match more than it meant (a leaf ``proj``
also ends ``o_proj``); we compute the set of modules and give PEFT a compact regex matching
exactly that set, checked before it is used. ``target_modules="all-linear"`` means every flag on
(not PEFT's all-linear, which would also adapt the projectors). A list of leaf names with every
flag on goes to PEFT as given; with a flag off, it is intersected with the flags' selection.
``finetune_last_n_layers`` (or ``layers_to_transform``) narrows the language decoder to some of its
layers.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

VISION_WORDS = ("vision", "image", "visual", "patch")
LANGUAGE_WORDS = ("language", "text")
ATTENTION_WORDS = ("self_attn", "attention", "attn", "mixer")
MLP_WORDS = ("mlp", "feed_forward", "ffn", "dense", "mixer")
_TEXT_DECODER = re.compile(r"(?:.*\.)?model\.layers\.\d+\.[^.]+\..+")


def select_lora_modules(model: nn.Module, *, vision: bool, language: bool, attention: bool, mlp: bool,
                        target_modules=None) -> list[str]:
    """Module paths (as ``model.named_modules`` gives them) that the flags select."""
    if not (vision or language):
        raise ValueError("finetune_vision_layers and finetune_language_layers are both False: nothing to "
                         "finetune; turn at least one on.")
    if not (attention or mlp):
        raise ValueError("finetune_attention_modules and finetune_mlp_modules are both False: nothing to "
                         "finetune; turn at least one on.")
    linear = [name for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    if target_modules is None:
        counts = Counter(name.rsplit(".", 1)[-1] for name in linear)
        candidates = [name for name in linear if counts[name.rsplit(".", 1)[-1]] > 1]
    else:
        wanted = set(target_modules)
        candidates = [name for name in linear if name.rsplit(".", 1)[-1] in wanted]
    parts = (VISION_WORDS if vision else ()) + (LANGUAGE_WORDS if language else ())
    components = (ATTENTION_WORDS if attention else ()) + (MLP_WORDS if mlp else ())
    selected = [name for name in candidates if _selected(name, parts, components, language)]
    if not selected:  # Unsloth then drops the model-part words
        selected = [name for name in candidates if _has_in_order(name, (), components)]
    if not selected:
        raise ValueError("The finetune_* flags select no linear layer of this model; turn more flags on or "
                         "pass target_modules explicitly.")
    return selected


def _selected(name: str, parts: tuple[str, ...], components: tuple[str, ...], language: bool) -> bool:
    if _has_in_order(name, parts, components):
        return True
    return language and bool(_TEXT_DECODER.fullmatch(name)) and _has_in_order(name, (), components)


def _has_in_order(name: str, parts: tuple[str, ...], components: tuple[str, ...]) -> bool:
    """A part word, then a component word, then the leaf (substring semantics, as Unsloth's regex)."""
    prefix = name.rsplit(".", 1)[0]
    start = 0
    if parts:
        ends = [prefix.find(word) + len(word) for word in parts if word in prefix]
        if not ends:
            return False
        start = min(ends)
    return any(word in prefix[start:] for word in components)


def exact_regex(names: list[str], universe: list[str]) -> str:
    """A regex that ``re.fullmatch``-es exactly ``names`` among ``universe`` (all module names):
    layer indices folded to a digits pattern and leaves grouped by parent when that stays exact, else the
    plain alternation of the names."""
    leaves_by_parent: dict[str, set[str]] = {}
    for name in names:
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        folded = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(parent + "."))
        leaves_by_parent.setdefault(folded, set()).add(re.escape(leaf))
    regex = "|".join(f"{parent}(?:{'|'.join(sorted(leaves))})" for parent, leaves in sorted(leaves_by_parent.items()))
    wanted = set(names)
    if {n for n in universe if re.fullmatch(regex, n)} == wanted and all(re.fullmatch(regex, n) for n in wanted):
        return regex
    return "|".join(re.escape(n) for n in sorted(wanted))


def lora_target(model: nn.Module, *, vision: bool, language: bool, attention: bool, mlp: bool,
                target_modules=None):
    """What to pass PEFT as ``target_modules`` for these flags (see the module docstring)."""
    if target_modules == "all-linear":
        vision = language = attention = mlp = True
        target_modules = None
    if isinstance(target_modules, str):
        return target_modules  # a user's regex: theirs to mean
    if target_modules is not None and vision and language and attention and mlp:
        return list(target_modules)
    selected = select_lora_modules(model, vision=vision, language=language, attention=attention, mlp=mlp,
                                   target_modules=target_modules)
    return exact_regex(selected, _module_names(model))


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def decoder_layers_only(model: nn.Module, target, *, last_n: int | None = None, layers=None):
    """``target`` narrowed to some layers of the language decoder: the last ``last_n`` (Unsloth's
    ``finetune_last_n_layers``) or the indices in ``layers`` (PEFT's ``layers_to_transform``, which
    PEFT itself refuses next to a regex). Vision-tower modules in ``target`` are kept."""
    total = model.config.get_text_config().num_hidden_layers
    if last_n is not None:
        if layers is not None:
            raise ValueError("Pass finetune_last_n_layers or layers_to_transform, not both.")
        if isinstance(last_n, bool) or not isinstance(last_n, int) or not 1 <= last_n <= total:
            raise ValueError(f"finetune_last_n_layers must be an integer in 1..{total} (the decoder's layers), "
                             f"got {last_n!r}.")
        layers = range(total - last_n, total)
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total]
    if bad or not layers:
        raise ValueError(f"layers_to_transform must be decoder layer indices in 0..{total - 1}, got {layers!r}.")
    linear = [name for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    if isinstance(target, str):
        chosen = [name for name in linear if re.fullmatch(target, name)]
    else:
        chosen = [name for name in linear if name.rsplit(".", 1)[-1] in set(target)]
    wanted = set(layers)
    kept = [name for name in chosen
            if (layer := _DECODER_LAYER.search(name)) is None or int(layer.group(1)) in wanted]
    return exact_regex(kept, _module_names(model))


_DECODER_LAYER = re.compile(r"(?:^|\.)(?:language_model\.|model\.)layers\.(\d+)\.")
