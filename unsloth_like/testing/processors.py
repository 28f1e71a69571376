"""Real transformers processors for the zoo's vision-language models, built locally (no hub).

A zoo VLM directory holds what a real checkpoint holds: the model, its tokenizer and the family's
own processor (image processor, video processor where the family has one, chat template), so
``AutoProcessor.from_pretrained(zoo_model_dir(name))`` returns the same classes a user gets from
the hub and every test, benchmark and notebook that feeds images goes through the real
preprocessing code (resizing, patching, placeholder-token expansion, ``mm_token_type_ids``...).

* ``save_processor(spec, directory)`` builds the processor for a VLM ``ZooSpec`` from the tokenizer
  already saved in ``directory``, with sizes derived from the model config (patch/merge sizes,
  Gemma 3's tokens per image, mllama's tile size and count) plus the spec's small pixel budgets, and
  saves it there; ``zoo.build_model_dir`` calls it.
* ``make_images(n, sizes, seed)`` draws small deterministic RGB images (noise plus coloured shapes).
* ``vlm_chat_batch(name_or_processor, ...)`` renders 1-2 image conversations with the processor's
  chat template and returns the processor's batch, as a user's data collator would build it.

Processor settings per family (see ``zoo.ZOO`` for the model configs):

* Qwen2-VL / Qwen2.5-VL: ``Qwen2VLImageProcessor`` (patch 14, merge 2, temporal 2) with
  ``min_pixels=56*56``, ``max_pixels=28*28*16``: a 56x56 image is one 4x4 grid of patches
  (``image_grid_thw=[[1, 4, 4]]``) and 4 ``<|image_pad|>`` tokens; the ``Qwen2VLVideoProcessor``
  uses the same pixel budget.
* Qwen3-VL: the same image processor class with patch 16 (factor 32, mean/std 0.5 as Qwen3-VL
  ships it), ``min_pixels=64*64``, ``max_pixels=32*32*16``: a 56x56 image is resized to 64x64,
  ``image_grid_thw=[[1, 4, 4]]``, 4 tokens; ``Qwen3VLVideoProcessor`` for videos.
* Gemma 3: ``Gemma3ImageProcessor`` resizing to the SigLIP ``image_size`` (56), no pan-and-scan;
  ``Gemma3Processor(image_seq_length=mm_tokens_per_image)`` expands each ``<start_of_image>`` into
  ``\\n\\n<start_of_image>`` + 4 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
* mllama: ``MllamaImageProcessor`` with 28x28 tiles and ``max_image_tiles`` = the vision config's
  ``max_num_tiles`` (2); one ``<|image|>`` token per image, which the text cross-attends through
  ``cross_attention_mask``.

All image processors here are the torchvision-backed classes transformers picks by default, so
these processors need torchvision (the video processors always do).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .zoo import ZooSpec

# A conversation per batch row: (question, answer). Each user turn carries one image.
_CONVERSATIONS = [("Describe.", "A cat."), ("What colour is the square?", "It is red.")]


def build_processor(spec: "ZooSpec", tokenizer):
    """The family's transformers processor for VLM ``spec``, around ``tokenizer`` (not saved)."""
    import transformers

    config = spec.config
    vision = config.get("vision_config", {})
    image_kwargs = dict(spec.processor.get("image", {}))
    video_kwargs = dict(spec.processor.get("video", {}))
    chat_template = tokenizer.chat_template
    family = spec.model_type

    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patching = {"patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
                    "merge_size": vision["spatial_merge_size"]}
        image_processor = transformers.Qwen2VLImageProcessor(**patching, **image_kwargs)
        video_class = transformers.Qwen3VLVideoProcessor if family == "qwen3_vl" else transformers.Qwen2VLVideoProcessor
        video_processor = video_class(**patching, **video_kwargs)
        processor_class = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
                           "qwen3_vl": transformers.Qwen3VLProcessor}[family]
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                               chat_template=chat_template)
    if family == "gemma3":
        side = vision["image_size"]
        image_processor = transformers.Gemma3ImageProcessor(size={"height": side, "width": side}, **image_kwargs)
        return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=chat_template,
                                            image_seq_length=config["mm_tokens_per_image"])
    if family == "mllama":
        side = vision["image_size"]
        image_processor = transformers.MllamaImageProcessor(size={"height": side, "width": side},
                                                            max_image_tiles=vision["max_num_tiles"], **image_kwargs)
        return transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=chat_template)
    raise ValueError(f"No processor recipe for model type {family!r} (zoo model {spec.name!r}).")


def save_processor(spec: "ZooSpec", directory: str | Path) -> None:
    """Build the processor for VLM ``spec`` around the tokenizer saved in ``directory`` and save it
    there. transformers 5 writes the image and video processor settings into one
    ``processor_config.json`` (no ``preprocessor_config.json``) and re-saves the tokenizer:
    ``tokenizer.json`` and the chat template are unchanged, ``tokenizer_config.json`` gains
    ``processor_class`` (plus the bookkeeping keys a re-saved tokenizer carries)."""
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # else transformers would quietly substitute PIL-backed classes
        raise ImportError(f"Zoo model {spec.name!r} is saved with its real processor, whose image and video "
                          "processors need torchvision: pip install 'unsloth-like[vision]'.")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    build_processor(spec, tokenizer).save_pretrained(directory)


def make_images(
    n: int = 1, sizes: tuple[int, int] | list[tuple[int, int]] = (56, 56), seed: int = 0
) -> list["Image.Image"]:
    """``n`` small deterministic RGB images: seeded noise with a coloured rectangle and ellipse.

    ``sizes`` is one ``(width, height)`` for all images or one per image (PIL's order).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    if isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(v, int) for v in sizes):
        sizes = [sizes] * n
    sizes = list(sizes)
    if len(sizes) != n:
        raise ValueError(f"Got {len(sizes)} sizes for {n} images.")
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(noise, mode="RGB")
        draw = ImageDraw.Draw(image)
        for shape in ("rectangle", "ellipse"):
            x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
            y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            getattr(draw, shape)([x0, y0, x1 + 1, y1 + 1], fill=colour)
        images.append(image)
    return images


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    """One user turn with an image then ``question``; plus the assistant's ``answer`` if given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def vlm_chat_batch(
    name_or_processor,
    n_conversations: int = 1,
    *,
    image_sizes: tuple[int, int] | list[tuple[int, int]] = (56, 56),
    with_answer: bool = True,
    add_generation_prompt: bool = False,
    labels: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
):
    """A ready batch for a zoo VLM: ``n_conversations`` (1 or 2) chats, each with one image.

    ``name_or_processor`` is a zoo name (its saved processor is loaded) or a processor. Each chat is
    rendered with ``processor.apply_chat_template(..., tokenize=False)`` and the texts and images go
    through ``processor(text=..., images=..., padding=True, return_tensors="pt")`` with
    ``add_special_tokens=False``: the chat templates already render BOS where the family has one.
    ``labels=True`` adds ``labels``: the input ids with padding and image placeholder tokens at -100.
    """
    if isinstance(name_or_processor, str):
        import transformers

        from .zoo import zoo_model_dir

        processor = transformers.AutoProcessor.from_pretrained(zoo_model_dir(name_or_processor, cache_dir))
    else:
        processor = name_or_processor
    if not 1 <= n_conversations <= len(_CONVERSATIONS):
        raise ValueError(f"n_conversations must be between 1 and {len(_CONVERSATIONS)}, got {n_conversations}.")
    texts = [
        processor.apply_chat_template(chat_messages(question, answer if with_answer else None), tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
        for question, answer in _CONVERSATIONS[:n_conversations]
    ]
    images = [[image] for image in make_images(n_conversations, image_sizes, seed)]
    batch = processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    if labels:
        ignored = batch["attention_mask"] == 0
        for token_id in _placeholder_ids(processor):
            ignored |= batch["input_ids"] == token_id
        batch["labels"] = batch["input_ids"].masked_fill(ignored, -100)
    return batch


def _placeholder_ids(processor) -> list[int]:
    """Token ids the processor puts where image features go (never trained on as targets)."""
    tokenizer = processor.tokenizer
    ids = {getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None)}
    image_token = getattr(tokenizer, "image_token", None)  # Gemma 3: the soft tokens, not <start_of_image>
    if image_token is not None:
        ids.add(tokenizer.convert_tokens_to_ids(image_token))
    return sorted(i for i in ids if i is not None)
