"""``UnslothVisionDataCollator``: conversations with images -> one training batch for a VLM.

Each example is a conversation, in any of the shapes Unsloth's notebooks and TRL datasets use:

* ``{"messages": [...]}`` or ``{"conversations": [...]}`` or the list of messages itself, with
  images inside the messages as ``{"type": "image", "image": <PIL | path | URL | bytes | dict>}``;
* the same with a top-level ``images`` (or ``image``) column: images then fill the
  ``{"type": "image"}`` placeholders in order, or, when the messages have none, go in front of
  the first user message's text (TRL's convention);
* ``{"prompt": [...], "completion": [...]}`` (conversational prompt/completion), where with
  ``completion_only_loss`` (the default) only the completion is trained on.

Videos go in messages as ``{"type": "video", "video": [frame, frame, ...]}`` (frames as images
are given: PIL, paths, bytes...; resized like images) or as a path or URL to a video file, which
the processor decodes (that needs a video backend such as torchcodec or PyAV); a local file that
is not there is an error, never an empty video.

A message whose ``content`` is a string is taken as one text part, and keys whose value is None
(Arrow fills missing struct fields with None) are dropped. The batch is one processor call over
the rendered chat templates and the images (resized as ``resize`` says), padded on the right.

Labels are the input ids with ``ignore_index`` at padding and at **every** image/video/audio
placeholder or delimiter token (the model cannot predict what an image will be), and, with
``train_on_responses_only``, everywhere except the assistant replies (markers as in
``unsloth_like.train_on_responses_only``). ``pixel_values`` are cast to the model's dtype.

``max_seq_length`` (default: the ``max_seq_length`` the model was loaded with) truncates the text
after the last image token; a sample whose image tokens would be cut is an error naming the
sample and the length it needs, instead of the model's "image features and image tokens do not
match" in the middle of training.

``force_match`` and ``num_proc`` are accepted for Unsloth compatibility and have no effect here:
batches are built on the fly (no dataset pass to parallelise), and placeholders are always
matched to images one to one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import check_resize, load_image, resize_image
from .responses_only import IGNORE_INDEX, chat_template_parts, response_masker

logger = logging.getLogger(__name__)

# Placeholder and delimiter tokens of the VLM families we know (only those in a tokenizer's
# vocabulary are used), on top of the processor's own ``image_token``-style attributes.
MEDIA_TOKENS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",  # Qwen-VL
    "<|image|>",  # Llama 3.2 Vision
    "<image_soft_token>", "<start_of_image>", "<end_of_image>",  # Gemma 3
    "<audio_soft_token>", "<start_of_audio>", "<end_of_audio>",  # Gemma 3n
    "<image>", "<video>",  # Llava, Idefics, SmolVLM
    "<fake_token_around_image>", "<global-img>",  # Idefics 3, SmolVLM
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",  # Pixtral, Mistral 3
    "<img>", "</img>", "<IMG_CONTEXT>",  # InternVL
)
_PROCESSOR_TOKEN_ATTRIBUTES = ("image_token", "video_token", "audio_token", "boi_token", "eoi_token",
                               "image_start_token", "image_end_token", "vision_start_token", "vision_end_token")
_DEFAULT_IMAGE_SIZE = 512  # Unsloth's bound when the vision config has no image_size (the Qwen-VL family)
ROW_KEY = "_unsloth_like_row"  # see trainer.vision_collator_settings: list datasets by row number
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask",
                  "labels")


class UnslothVisionDataCollator:
    """Collate vision-language conversations for ``SFTTrainer`` (see the module docstring)."""

    def __init__(self, model, processor, max_seq_length: int | None = None, formatting_func=None, resize="min",
                 ignore_index: int = IGNORE_INDEX, train_on_responses_only: bool = False,
                 instruction_part: str | None = None, response_part: str | None = None, force_match: bool = True,
                 num_proc=None, completion_only_loss: bool = True, pad_to_multiple_of: int | None = None,
                 resize_dimension=0, snap_to_patch_size: bool = False, last_response_only: bool = False):
        if getattr(processor, "image_processor", None) is None:
            raise TypeError(
                f"UnslothVisionDataCollator needs a vision-language processor with an image processor, got "
                f"{type(processor).__name__}; pass the processor FastVisionModel.from_pretrained returned (a "
                'missing torchvision or Pillow can degrade it to a tokenizer: pip install "unsloth_like[vision]").')
        check_resize(resize, resize_dimension)
        if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                           or max_seq_length <= 0):
            raise ValueError(f"max_seq_length must be a positive integer or None, got {max_seq_length!r}.")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.formatting_func, self.ignore_index = formatting_func, ignore_index
        self.completion_only_loss, self.pad_to_multiple_of = completion_only_loss, pad_to_multiple_of
        self.max_seq_length = max_seq_length if max_seq_length is not None else _model_max_seq_length(model)
        self.dtype = _model_dtype(model)
        self.media_ids = media_token_ids(processor)
        self._media = torch.tensor(sorted(self.media_ids), dtype=torch.long)
        self.image_size = _image_size(model, resize)
        self.resize_dimension, self.snap = resize_dimension, (2 * _patch_size(model) if snap_to_patch_size else None)
        self.responses, self._rows = None, None
        if train_on_responses_only:
            self.set_responses_only(instruction_part, response_part, last_response_only)

    def set_responses_only(self, instruction_part=None, response_part=None, last_response_only=False) -> None:
        """Train on the assistant replies only (``train_on_responses_only(trainer)`` calls this)."""
        if (instruction_part is None) != (response_part is None):
            raise ValueError("Give both instruction_part and response_part, or neither (to derive them from the "
                             "processor's chat template).")
        if instruction_part is None:
            instruction_part, response_part = chat_template_parts(self.processor)
        self.responses = response_masker(self.tokenizer, instruction_part, response_part, last_response_only)

    @staticmethod
    def row_dataset(indices):
        """A ``datasets.Dataset`` of row numbers into a list given to ``with_rows``."""
        from datasets import Dataset

        return Dataset.from_dict({ROW_KEY: list(indices)})

    def with_rows(self, rows: list) -> "UnslothVisionDataCollator":
        """A copy of this collator that turns ``{ROW_KEY: i}`` examples into ``rows[i]``."""
        clone = copy.copy(self)
        clone._rows = rows
        return clone

    # --- one batch --------------------------------------------------------------------------------

    def __call__(self, examples: list) -> dict:
        if self._rows is not None:
            examples = [self._rows[e[ROW_KEY]] if isinstance(e, dict) and ROW_KEY in e else e for e in examples]
        if self.formatting_func is not None:
            examples = [self.formatting_func(example) for example in examples]
        samples = [self._sample(example, i) for i, example in enumerate(examples)]
        batch = self._process([self._render(sample.messages) for sample in samples], samples)
        prompt_lengths = None
        if self.completion_only_loss and any(sample.prompt is not None for sample in samples):
            prompt_lengths = self._prompt_lengths(samples)
        batch["labels"] = self._labels(batch, prompt_lengths)
        batch = self._truncate(batch)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch and self.dtype is not None and batch[key].is_floating_point():
                batch[key] = batch[key].to(self.dtype)
        return dict(batch)

    def _sample(self, example, index: int) -> "_Sample":
        """One example's conversation (and prompt, for prompt/completion pairs), media loaded."""
        prompt = None
        if isinstance(example, dict) and "prompt" in example and "completion" in example:
            prompt = _normalise(example["prompt"], index)
            messages = prompt + _normalise(example["completion"], index)
        elif isinstance(example, dict) and ("messages" in example or "conversations" in example):
            messages = _normalise(example.get("messages", example.get("conversations")), index)
        elif isinstance(example, list):
            messages = _normalise(example, index)
        else:
            keys = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise ValueError(f"Sample {index} has no conversation: expected 'messages', 'conversations' or "
                             f"'prompt'+'completion', got {keys}.")
        images = _attach_images(messages, _top_level_images(example), index)
        if prompt is not None:
            prompt = messages[:len(prompt)]
        images = [self._resize(load_image(image, where=f"sample {index}, image {k}")) for k, image in enumerate(images)]
        videos = [self._video(part.get("video"), f"sample {index}, video {k}")
                  for k, part in enumerate(_parts(messages, ("video",)))]
        return _Sample(messages, prompt, images, videos)

    def _video(self, video, where: str):
        """A video part's value: its frames loaded and resized, or a file path/URL for the processor."""
        if isinstance(video, (list, tuple)):
            if not video:
                raise ValueError(f"{where} has no frames.")
            return [self._resize(load_image(frame, where=f"{where}, frame {i}")) for i, frame in enumerate(video)]
        if isinstance(video, str):
            if not video.startswith(("http://", "https://")):
                path = Path(video[len("file://"):] if video.startswith("file://") else video).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: video file {path} does not exist.")
                return str(path)
            return video
        raise TypeError(f"{where} is a {type(video).__name__}; give a list of frames or a video file path/URL.")

    def _render(self, messages) -> str:
        return self.processor.apply_chat_template(_without_payloads(messages), tokenize=False,
                                                  add_generation_prompt=False)

    def _resize(self, image):
        image = resize_image(image, self.image_size, self.resize_dimension)
        if self.snap:
            width, height = image.size
            snapped = (max(self.snap, width // self.snap * self.snap), max(self.snap, height // self.snap * self.snap))
            image = resize_image(image, snapped)
        return image

    def _process(self, texts, samples):
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt", "add_special_tokens": False}
        if any(sample.images for sample in samples):
            kwargs["images"] = [sample.images for sample in samples]
        if any(sample.videos for sample in samples):
            kwargs["videos"] = [video for sample in samples for video in sample.videos]
        if self.pad_to_multiple_of is not None:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # truncation and prompt masks count from the left
        try:
            return self.processor(**kwargs)
        finally:
            self.tokenizer.padding_side = side

    def _prompt_lengths(self, samples) -> list[int | None]:
        lengths = []
        for i, sample in enumerate(samples):
            if sample.prompt is None:
                lengths.append(None)
                continue
            prompt_text = self.processor.apply_chat_template(_without_payloads(sample.prompt), tokenize=False,
                                                             add_generation_prompt=True)
            if not self._render(sample.messages).startswith(prompt_text):
                raise ValueError(f"Sample {i}: the chat template renders the prompt with a generation prompt "
                                 "differently from the start of the whole conversation, so the completion cannot "
                                 "be located; pass completion_only_loss=False or use 'messages'.")
            prompt_sample = _Sample(sample.prompt, None, sample.images[:len(_parts(sample.prompt, _IMAGE_TYPES))],
                                    sample.videos[:len(_parts(sample.prompt, ("video",)))])
            encoded = self._process([prompt_text], [prompt_sample])
            lengths.append(int(encoded["attention_mask"].sum()))
        return lengths

    def _labels(self, batch, prompt_lengths) -> torch.Tensor:
        input_ids = batch["input_ids"]
        labels = input_ids.clone()
        labels[batch["attention_mask"] == 0] = self.ignore_index
        if self.media_ids:
            labels[torch.isin(labels, self._media)] = self.ignore_index
        if prompt_lengths is not None:
            for row, length in enumerate(prompt_lengths):
                if length is not None:
                    labels[row, :length] = self.ignore_index
        if self.responses is not None:
            for row in range(input_ids.shape[0]):
                length = int(batch["attention_mask"][row].sum())
                wanted = self.responses.labels(input_ids[row, :length].tolist())
                keep = torch.zeros_like(labels[row], dtype=torch.bool)
                keep[:length] = torch.tensor([t != IGNORE_INDEX for t in wanted])
                labels[row][~keep] = self.ignore_index
                if not keep.any():
                    raise ValueError(f"Sample {row} of this batch has no reply left to train on: searched "
                                     f"{self.responses.describe()}. Pass the markers the chat template really "
                                     "writes (instruction_part=..., response_part=...).")
        return labels

    def _truncate(self, batch):
        limit = self.max_seq_length
        if limit is None or batch["input_ids"].shape[1] <= limit:
            return batch
        lengths = batch["attention_mask"].sum(dim=1)
        media = torch.isin(batch["input_ids"], self._media) if self.media_ids else None
        for row in range(batch["input_ids"].shape[0]):
            if media is not None and media[row, limit:].any():
                last = int(media[row].nonzero().max()) + 1
                raise ValueError(
                    f"Sample {row} of this batch is {int(lengths[row])} tokens long and its image tokens end at "
                    f"token {last}: max_seq_length={limit} would cut image tokens, which the model cannot train "
                    f"on. Raise max_seq_length to at least {last} (in the collator and in SFTConfig(max_length=...)) "
                    "or make the images smaller (resize=...).")
        for key in _SEQUENCE_KEYS:
            if key in batch and torch.is_tensor(batch[key]) and batch[key].dim() >= 2:
                batch[key] = batch[key][:, :limit]
        return batch


# --- conversations --------------------------------------------------------------------------------


def _normalise(messages, index: int) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"Sample {index}: a conversation must be a list of {{'role', 'content'}} dicts, got "
                         f"{type(messages).__name__}.")
    normalised = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            message["content"] = [{k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                                  for part in content]
        normalised.append(message)
    return normalised


def _top_level_images(example) -> list | None:
    if not isinstance(example, dict):
        return None
    if example.get("images") is not None:
        return list(example["images"])
    if example.get("image") is not None:
        return [example["image"]]
    return None


@dataclass
class _Sample:
    messages: list[dict]
    prompt: list[dict] | None
    images: list
    videos: list


_IMAGE_TYPES = ("image", "image_url")


def _parts(messages, types: tuple[str, ...]) -> list[dict]:
    """The content parts of ``types`` in ``messages``, in order."""
    return [part for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, dict) and part.get("type") in types]


def _attach_images(messages, top_level: list | None, index: int) -> list:
    """The images of one conversation, in order; placeholders filled from ``top_level``."""
    parts = _parts(messages, _IMAGE_TYPES)
    if top_level is None:
        images = []
        for part in parts:
            image = part.get("image", part.get("image_url"))
            if isinstance(image, dict) and "url" in image and part.get("type") == "image_url":
                image = image["url"]
            if image is None:
                raise ValueError(f"Sample {index} has an image part without an image; put the image in the part "
                                 "({'type': 'image', 'image': ...}) or in an 'images' column.")
            images.append(image)
        return images
    if not parts:  # TRL's convention: the images go before the first user message's text
        user = next((m for m in messages if m.get("role") == "user"), None)
        if user is None:
            raise ValueError(f"Sample {index} has images but no user message to put them in.")
        user["content"] = [{"type": "image"} for _ in top_level] + list(user.get("content") or [])
        return top_level
    if len(parts) != len(top_level):
        raise ValueError(f"Sample {index} has {len(parts)} image placeholders in its messages but {len(top_level)} "
                         "images in its 'images' column; they must match one to one.")
    return top_level


def _marker(part):
    if isinstance(part, dict) and part.get("type") in _IMAGE_TYPES:
        return {"type": "image"}
    if isinstance(part, dict) and part.get("type") == "video":
        return {"type": "video"}
    return part


def _without_payloads(messages) -> list[dict]:
    """The messages with media parts reduced to ``{"type": "image"|"video"}`` (templates need only
    the marker)."""
    stripped = copy.copy(messages)
    for i, message in enumerate(stripped):
        if isinstance(message.get("content"), list):
            stripped[i] = {**message, "content": [_marker(p) for p in message["content"]]}
    return stripped


# --- what the model and processor tell us ---------------------------------------------------------


def media_token_ids(processor) -> set[int]:
    """Ids of every image/video/audio placeholder or delimiter token the processor's tokenizer has."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    names = set(MEDIA_TOKENS)
    for attribute in _PROCESSOR_TOKEN_ATTRIBUTES:
        for owner in (processor, tokenizer):
            value = getattr(owner, attribute, None)
            if isinstance(value, str):
                names.add(value)
    ids = {vocab[name] for name in names if name in vocab}
    ids.discard(tokenizer.unk_token_id)
    return ids


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_max_seq_length(model) -> int | None:
    return getattr(_base(model), "max_seq_length", None)


def _model_dtype(model) -> torch.dtype | None:
    dtype = getattr(_base(model), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _vision_config(model):
    return getattr(_base(model).config, "vision_config", None)


def _image_size(model, resize):
    if resize == "max":
        return None
    if resize != "min":
        return resize
    size = getattr(_vision_config(model), "image_size", None)
    if isinstance(size, (tuple, list)):
        size = max(size)
    if size is None:
        logger.info("The vision config has no image_size: images are bounded to %d pixels (resize='min').",
                    _DEFAULT_IMAGE_SIZE)
        return _DEFAULT_IMAGE_SIZE
    return int(size)


def _patch_size(model) -> int:
    size = getattr(_vision_config(model), "patch_size", None) or 14
    return max(size) if isinstance(size, (tuple, list)) else int(size)
