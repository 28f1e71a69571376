"""GGUF export of a vision-language model: the language model's GGUF (one per quantisation
method) plus the projector's ``<stem>.<F16|BF16>-mmproj.gguf`` (``mmproj.py``), as llama.cpp's
converter writes them with and without ``--mmproj``.

The family decides everything (``models.registry.VisionSpec.mmproj``); a family llama.cpp cannot
run (mllama) and any family we have no recipe for are refused before any work, with the reason.
The checkpoint's tensors are split between the two files: the projector claims the vision tower
and projector, the language model gets the rest under llama.cpp's text names (``language_model.``
dropped, as the converter drops it). Both files are planned, checked and sized before any tensor
is read, written in one pass and renamed into place together.

Ollama: it imports vision models from the merged safetensors directory
(``save_pretrained_merged``), not from a GGUF plus a separate mmproj; the Modelfile written next to
the text GGUF serves text chat, and a logged note says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...models.registry import supported_vision_model_types, vision_spec_for
from ..sources import TensorEntry
from .mmproj import (PROJECTORS, Projector, check_projector, image_normalisation, plan_projector, projector_file_type,
                     projector_output)
from .writer import plan_tensors, text_outputs

logger = logging.getLogger(__name__)

OLLAMA_NOTE = ("Ollama imports vision models from the merged safetensors directory: run "
               "model.save_pretrained_merged(dir, processor) and `ollama create` with `FROM <dir>`. It does not take "
               "a GGUF plus a separate mmproj file, so the Modelfile written here serves text-only chat; the "
               "%s + %s pair is for llama.cpp (llama-mtmd-cli -m ... --mmproj ..., llama-server, "
               "llama-cpp-python's MTMDChatHandler).")


def vision_projector_kind(config) -> str:
    """The family's ``clip.projector_type``, or the reason it cannot be exported (raised)."""
    model_type = getattr(config, "model_type", None)
    spec = vision_spec_for(model_type)
    if spec is not None and spec.no_gguf:
        raise ValueError(spec.no_gguf)
    if spec is None or spec.mmproj not in PROJECTORS:
        exportable = [t for t in supported_vision_model_types() if (vision_spec_for(t).mmproj in PROJECTORS)]
        raise ValueError(f"GGUF export has no recipe for the vision-language model type {model_type!r} (supported: "
                         f"{', '.join(exportable)}); save it with save_pretrained_merged and convert it with "
                         "llama.cpp's convert_hf_to_gguf.py (once for the model, once with --mmproj).")
    return spec.mmproj


def mmproj_path(directory: Path, stem: str, entries: list[TensorEntry], config) -> Path:
    """``<stem>.<F16|BF16>-mmproj.gguf`` for the vision side of ``entries``."""
    kind = vision_projector_kind(config)
    probe = Projector(kind, config, (0.0,) * 3, (1.0,) * 3)
    ftype = projector_file_type([e for e in entries if probe.owns(e.key)])
    return directory / f"{stem}.{ftype.name.removeprefix('MOSTLY_')}-mmproj.gguf"


def plan_vlm(entries: list[TensorEntry], config, processor, methods: list[str], paths: list[Path],
             projector_path: Path, vocab, name: str) -> list:
    """The ``OutputFile`` list (text files, then the projector) of a vision-language model."""
    kind = vision_projector_kind(config)
    mean, std = image_normalisation(processor)
    projector = Projector(kind, config, mean, std)
    check_projector(projector)
    vision = [e for e in entries if projector.owns(e.key)]
    text = [_text_entry(e) for e in entries if not projector.owns(e.key)]
    text_config = config.get_text_config()
    text_plan = plan_tensors(text, text_config, methods)
    ftype = projector_file_type(vision)
    vision_plan = plan_projector(vision, projector, ftype)
    if not vision_plan:
        raise ValueError(f"No vision tensors were found for {config.model_type}; nothing to write to {projector_path}.")
    outputs = text_outputs(text_plan, text_config, vocab, methods, paths, name, extra=_text_extra(config))
    outputs.append(projector_output(projector_path, projector, vision_plan, name, ftype))
    return outputs


def _text_entry(entry: TensorEntry) -> TensorEntry:
    """A text tensor under the name llama.cpp's converter maps (``language_model.`` removed:
    Gemma 3's ``language_model.model.layers`` and Qwen3-VL's ``model.language_model.layers``
    become ``model.layers``)."""
    key = entry.key.replace("language_model.", "")
    return entry if key == entry.key else TensorEntry(key, entry.shape, entry.dtype, entry.load)


def _text_extra(config):
    """Text-file keys that come from the vision config: Qwen3-VL's deepstack layer count (the
    language model adds that many vision feature levels to its first layers)."""
    if config.model_type != "qwen3_vl":
        return None
    deepstack = getattr(config.vision_config, "deepstack_visual_indexes", None) or []
    return lambda writer: writer.add_num_deepstack_layers(len(deepstack))


def log_ollama_note(text_path: Path, projector_path: Path) -> None:
    logger.warning(OLLAMA_NOTE, text_path.name, projector_path.name)


__all__ = ["OLLAMA_NOTE", "mmproj_path", "plan_vlm", "vision_projector_kind"]
