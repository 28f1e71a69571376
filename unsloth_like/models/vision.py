"""Vision-language models in the loader: detection, 16-bit parts of a quantised load, processor.

``FastVisionModel`` (``models.loader``) loads any checkpoint whose config has a vision tower with
``AutoModelForImageTextToText`` and returns it with its processor. What is specific to such
models lives here:

* which modules stay in 16 bits when the rest is quantised: the output embedding, every
  projector/merger between the vision tower and the decoder, and whole vision towers that
  Unsloth keeps unquantised (Gemma 3's SigLIP). Unsloth lists bare names ("merger",
  "vision_tower") and patches transformers' matcher process-wide to find them anywhere in a
  path; transformers 5 matches patterns only as a prefix at a module boundary or as a suffix, so
  bare names miss ``model.visual.merger.mlp.0``. We instead find the modules on a meta-device
  instance of the model and pass their full paths, which transformers matches as it is.
* the processor: ``AutoProcessor`` with an image processor, the tokenizer's chat template when
  the processor has none, and the tokenizer's special tokens mirrored on the processor (users
  call the processor ``tokenizer`` and read ``tokenizer.eos_token``); directories saved by older
  Unsloth releases, whose ``processor_class`` reads ``_Unsloth_Patched_<Class>``, load too;
* ``generate`` inputs: pixel tensors cast to the model's dtype, token-type ids dropped where the
  model's forward takes none.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

VISION_EXTRA = 'pip install "unsloth_like[vision]"'
# Module names Unsloth never quantises (matched as whole path components): the output embedding,
# projectors between a vision tower and the decoder, and SigLIP-style towers.
KEEP_UNQUANTIZED_NAMES = ("lm_head", "multi_modal_projector", "merger", "deepstack_merger_list",
                          "modality_projection", "vision_tower", "vision_embedder", "embed_vision")
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_MARK = "_unsloth_like_vision_inputs"


def is_vision_config(config) -> bool:
    """A config with a vision tower that transformers' image-text-to-text auto class can load."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config is None:
        return False
    return getattr(config, "vision_config", None) is not None and (
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or any(a.endswith("ForConditionalGeneration") for a in getattr(config, "architectures", None) or []))


def check_vision_dependencies() -> None:
    """Pillow is needed by every image processor; raise before any weight is read."""
    if importlib.util.find_spec("PIL") is None:
        raise ImportError(f"Vision-language models need Pillow for their image processor; {VISION_EXTRA}.")


def keep_unquantized_modules(config, trust_remote_code: bool = False) -> list[str]:
    """Full paths of the modules a 4/8-bit load keeps in 16 bits (see the module docstring)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    return modules_named(model, KEEP_UNQUANTIZED_NAMES)


def modules_named(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """The outermost modules of ``model`` that have one of ``names`` as a path component."""
    found: list[str] = []
    for path, _ in model.named_modules():
        if path and set(path.split(".")) & set(names) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return found


# Files a processor is saved as (transformers 5 writes processor_config.json with the image/video
# processors nested; older releases and other tools read the standalone ones).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
_UNSLOTH_PREFIX = "_Unsloth_Patched_"  # what Unsloth once wrote into processor_class (its issue #4085)


def load_processor(source: str, **kwargs):
    """``AutoProcessor.from_pretrained(source)``, checked to handle images, with a chat template."""
    from transformers import AutoProcessor

    try:
        with _without_unsloth_prefix(source) as directory:
            processor = AutoProcessor.from_pretrained(directory, **kwargs)
    except ImportError as error:  # e.g. "Qwen2VLVideoProcessor requires the Torchvision library"
        raise ImportError(f"Loading the processor of {source} failed: {str(error).splitlines()[0]} "
                          f"Install the vision extra: {VISION_EXTRA}.") from error
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{source} has no image processor (AutoProcessor gave {type(processor).__name__}); "
                         "a vision-language model needs its preprocessor_config.json next to the tokenizer.")
    tokenizer = processor.tokenizer
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    return processor


@contextlib.contextmanager
def _without_unsloth_prefix(source: str):
    """``source``, or, when its processor files name a ``_Unsloth_Patched_*`` processor class
    (which transformers cannot resolve: it would load a bare tokenizer), a temporary copy of those
    files with the prefix removed. The user's files are not changed."""
    directory = Path(source)
    files = [directory / name for name in PROCESSOR_FILES if (directory / name).is_file()] if directory.is_dir() else []
    if not any(_UNSLOTH_PREFIX in path.read_text(errors="ignore") for path in files if path.suffix == ".json"):
        yield source
        return
    logger.info("%s names an Unsloth-patched processor class; loading it under transformers' own name.", source)
    with tempfile.TemporaryDirectory() as copy:
        for path in files:
            target = Path(copy) / path.name
            if path.suffix == ".json":
                target.write_text(path.read_text().replace(_UNSLOTH_PREFIX, ""))
            else:
                shutil.copy2(path, target)
        yield copy


def mirror_special_tokens(processor) -> None:
    """``processor.eos_token`` and friends, as on its tokenizer (read by code written for tokenizers)."""
    tokenizer = processor.tokenizer
    for name in _SPECIAL_TOKENS:
        setattr(processor, name, getattr(tokenizer, name, None))
        setattr(processor, f"{name}_id", getattr(tokenizer, f"{name}_id", None))


def prepare_vision_inputs(model):
    """Bind a ``generate`` to ``model`` that casts pixel inputs to the model's floating dtype and
    drops token-type ids its forward does not take (idempotent; wraps any instance ``generate``;
    an encoding given as ``input_ids`` is unpacked first, so its pixels are cast too)."""
    from .generation import unpack_encoded_inputs, wrap_generate

    def prepare(self, args, kwargs):
        args, kwargs = unpack_encoded_inputs(args, kwargs)
        return args, adapt_vision_inputs(self, kwargs)

    return wrap_generate(model, _MARK, prepare)


def adapt_vision_inputs(model, inputs: dict) -> dict:
    """``inputs`` with pixel tensors in the dtype of the model's weights and token-type ids only
    where the model's forward accepts them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = _floating_dtype(base)
    accepted = _forward_parameters(type(base))
    adapted = {}
    for key, value in inputs.items():
        if key in PIXEL_INPUTS and torch.is_tensor(value) and value.is_floating_point() and dtype is not None:
            value = value.to(dtype)
        elif key in TOKEN_TYPE_INPUTS and key not in accepted:
            continue
        adapted[key] = value
    return adapted


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _floating_dtype(model) -> torch.dtype | None:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
