"""The projector GGUF (``mmproj``) of a vision-language model: vision tower + projector as
llama.cpp's ``clip`` file, which ``libmtmd`` (``llama-mtmd-cli --mmproj``, llama-cpp-python's
``MTMDChatHandler``, llama-server) loads next to the language model's GGUF.

Everything here follows llama.cpp's converter (``convert_hf_to_gguf.py --mmproj``: the
``MmprojModel`` base and ``Qwen2VLVisionModel`` / ``Qwen3VLVisionModel`` / ``Gemma3VisionModel``):

* metadata: ``general.architecture = "clip"``, ``general.type = "mmproj"``,
  ``clip.projector_type``, ``clip.has_vision_encoder``, ``clip.vision.*`` (image and patch size,
  widths, depth, heads, ``projection_dim`` = the text hidden size, the processor's image
  mean/std, and per family: Qwen2.5-VL's SiLU and window-attention pattern, Qwen3-VL's GELU,
  merge size and deepstack layers, Gemma 3's GELU, norm epsilon and ``projector.scale_factor``
  when it is not llama.cpp's default 4);
* tensors: names from gguf's ``MMPROJ`` map (``v.*`` encoder, ``mm.*`` projector), with Qwen's
  fused ``qkv`` split into q/k/v (Qwen2/2.5-VL; Qwen3-VL keeps ``attn_qkv``), the Conv3D patch
  embedding split along time into ``v.patch_embd.weight`` and ``v.patch_embd.weight.1``,
  Qwen3-VL's merger and deepstack mergers renamed (``mm.0``/``mm.2``, ``v.post_ln``,
  ``v.deepstack.{layer}.*``), Gemma 3's ``soft_emb_norm`` stored as ``w + 1`` and
  ``mm_input_projection_weight`` as ``mm.input_projection.weight``;
* types: the file is F16 or BF16 (never quantised further); 1-D tensors, norms, biases and
  position embeddings F32; the patch embedding F16 in an F16 file and F32 otherwise; Gemma 3's
  SigLIP embeddings F32 and its input projection F16.

Vision layer norms use transformers' epsilon (a fixed 1e-6 in every Qwen-VL vision block; the
SigLIP config's ``layer_norm_eps`` for Gemma 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import gguf
import torch
from gguf import GGMLQuantizationType as T

from ..sources import TensorEntry
from .writer import OutputFile, PlannedTensor

QWEN_VL = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger")
PROJECTORS = QWEN_VL + ("gemma3",)
_QWEN_VISION_EPS = 1e-6  # LayerNorm/RMSNorm(eps=1e-6) in transformers' Qwen2/2.5/3-VL vision blocks


@dataclass(frozen=True)
class Projector:
    """The projector file of one model: its projector type, the vision config and what llama.cpp
    needs from the rest of the model (text width, the processor's normalisation)."""

    kind: str  # clip.projector_type
    config: object  # the top-level transformers config
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def vision(self):
        return self.config.vision_config

    @property
    def depth(self) -> int:
        return getattr(self.vision, "depth", None) or self.vision.num_hidden_layers

    def owns(self, key: str) -> bool:
        """Whether checkpoint tensor ``key`` belongs to the vision side (the rest is the text model's)."""
        if self.kind in QWEN_VL:
            return key.startswith(("visual.", "model.visual."))
        return key.startswith(("vision_tower.", "vision_model.", "multi_modal_projector.", "model.vision_tower.",
                               "model.multi_modal_projector."))


def image_normalisation(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` of the processor's image processor (llama.cpp normalises
    pixels with them before the vision tower)."""
    image_processor = getattr(processor, "image_processor", None)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError("The projector GGUF needs the image processor's image_mean/image_std: pass the model's "
                         "processor (FastVisionModel.from_pretrained returns it), not only its tokenizer.")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_projector(projector: Projector) -> None:
    """Refuse, before any work, vision settings llama.cpp fixes instead of reading from the file."""
    vision = projector.vision
    if projector.kind in QWEN_VL and getattr(vision, "temporal_patch_size", 2) != 2:
        raise ValueError(f"llama.cpp's {projector.kind} splits the Conv3D patch embedding into exactly two frames; "
                         f"this model has temporal_patch_size={vision.temporal_patch_size}.")
    if projector.kind == "qwen2.5vl_merger":
        full = list(getattr(vision, "fullatt_block_indexes", None) or [])
        if not full or any(b - a != full[0] + 1 for a, b in zip(full, full[1:])):
            raise ValueError(f"llama.cpp needs Qwen2.5-VL's full-attention blocks evenly spaced (every n-th block); "
                             f"fullatt_block_indexes={full}.")
        window = getattr(vision, "window_size", 112)
        if window != 112:
            raise ValueError(f"llama.cpp's Qwen2.5-VL vision encoder uses a fixed 112-pixel attention window (the "
                             f"published models' value); this model's window_size is {window}, so its image features "
                             "would differ from transformers'.")


# --- metadata ---------------------------------------------------------------------------------------


def header(projector: Projector, name: str, ftype: gguf.LlamaFileType) -> Callable[[gguf.GGUFWriter], None]:
    """The ``clip.*`` key/values of the projector file."""
    config, vision = projector.config, projector.vision
    text = config.get_text_config()

    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(projector.kind)
        writer.add_vision_projection_dim(text.hidden_size)
        writer.add_vision_image_size(_image_size(projector))
        writer.add_vision_patch_size(vision.patch_size)
        width, ffn = _widths(projector)
        writer.add_vision_embedding_length(width)
        writer.add_vision_feed_forward_length(ffn)
        writer.add_vision_block_count(projector.depth)
        writer.add_vision_head_count(getattr(vision, "num_heads", None) or vision.num_attention_heads)
        writer.add_vision_image_mean(list(projector.image_mean))
        writer.add_vision_image_std(list(projector.image_std))
        if projector.kind in QWEN_VL:
            writer.add_vision_attention_layernorm_eps(_QWEN_VISION_EPS)
            writer.add_vision_spatial_merge_size(vision.spatial_merge_size)
        if projector.kind == "qwen2.5vl_merger":
            writer.add_vision_use_silu(True)
            writer.add_vision_n_wa_pattern(vision.fullatt_block_indexes[0] + 1)
        if projector.kind == "qwen3vl_merger":
            writer.add_vision_use_gelu(True)
            deepstack = set(getattr(vision, "deepstack_visual_indexes", None) or [])
            if deepstack:
                writer.add_vision_is_deepstack_layers([i in deepstack for i in range(projector.depth)])
        if projector.kind == "gemma3":
            writer.add_vision_attention_layernorm_eps(getattr(vision, "layer_norm_eps", 1e-6))
            writer.add_vision_use_gelu(True)
            scale = _gemma3_scale_factor(projector)
            if scale > 0 and scale != 4:  # llama.cpp's default; tiny test models differ
                writer.add_vision_projector_scale_factor(scale)
    return write


def _image_size(projector: Projector) -> int:
    vision = projector.vision
    if getattr(vision, "image_size", None):
        return vision.image_size
    if projector.kind == "qwen3vl_merger":  # learned position embeddings cover (image_size / patch)^2 patches
        return int(math.sqrt(vision.num_position_embeddings) * vision.patch_size)
    return 560  # Qwen2/2.5-VL resize freely; the converter's nominal size


def _widths(projector: Projector) -> tuple[int, int]:
    """``(embedding_length, feed_forward_length)`` as the converter writes them. For Qwen2-VL it
    takes ``embed_dim`` as the width and the config's ``hidden_size`` (the merger's output width)
    as the FFN length; llama.cpp's graph uses the tensors' shapes, not that number."""
    vision = projector.vision
    if getattr(vision, "embed_dim", None):
        return vision.embed_dim, vision.hidden_size
    return vision.hidden_size, vision.intermediate_size


def _gemma3_scale_factor(projector: Projector) -> int:
    vision = projector.vision
    per_side = int(math.sqrt(getattr(projector.config, "mm_tokens_per_image", 256)))
    return (vision.image_size // vision.patch_size) // per_side


# --- tensors ----------------------------------------------------------------------------------------


def plan_projector(entries: list[TensorEntry], projector: Projector, ftype: gguf.LlamaFileType) -> list[PlannedTensor]:
    """GGUF names, layouts and types of the projector's tensors (``entries`` are the vision
    side's checkpoint tensors); raises on a tensor llama.cpp would not know, before any is read."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, projector.depth + 8)  # + mm.{i} projector indices
    planned = []
    for entry in entries:
        key = _normalised_key(entry.key, projector.kind)
        if key is None:
            continue
        for name, produced in _converted(key, entry, projector, names):
            planned.append(PlannedTensor(name, produced, [_tensor_type(key, name, produced.shape, ftype)]))
    planned.sort(key=lambda p: _order(p.name))
    seen = [p.name for p in planned]
    if len(seen) != len(set(seen)):
        raise ValueError(f"Two checkpoint tensors map to the same projector tensor: {sorted(seen)}.")
    return planned


def _normalised_key(key: str, kind: str) -> str | None:
    """The checkpoint key in the form llama.cpp's converter maps (None: not written)."""
    if kind in QWEN_VL:
        return "visual." + key[len("model.visual."):] if key.startswith("model.visual.") else key
    key = key.removeprefix("model.")
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]  # transformers 5 saves SigLIP without it
    if "vision_model.head." in key:  # SigLIP's pooling head: Gemma 3 does not use it
        return None
    return key.replace("_weight", ".weight")


def _converted(key: str, entry: TensorEntry, projector: Projector, names) -> Iterator[tuple[str, TensorEntry]]:
    kind = projector.kind
    if kind in QWEN_VL and key.endswith("patch_embed.proj.weight"):  # Conv3D (out, in, t=2, h, w): one Conv2D per frame
        out, channels, _, height, width = entry.shape
        for frame, suffix in enumerate(("", ".1")):
            yield f"v.patch_embd.weight{suffix}", _derived(entry, (out, channels, height, width),
                                                           lambda t, f=frame: t[:, :, f])
        return
    if kind in ("qwen2vl_merger", "qwen2.5vl_merger") and ".qkv." in key:
        rows = entry.shape[0] // 3
        for i, part in enumerate("qkv"):
            yield _mapped(key.replace(".qkv.", f".{part}."), names), _derived(
                entry, (rows, *entry.shape[1:]), lambda t, i=i: t[i * rows:(i + 1) * rows])
        return
    if kind == "qwen3vl_merger" and key.startswith(("visual.merger.", "visual.deepstack_merger_list.")):
        yield _qwen3_merger_name(key, projector), entry
        return
    if kind == "qwen3vl_merger" and key == "visual.patch_embed.proj.bias":
        yield "v.patch_embd.bias", entry
        return
    if kind == "gemma3" and key.endswith("soft_emb_norm.weight"):
        yield _mapped(key, names), _derived(entry, entry.shape, lambda t: t.float() + 1)  # Gemma3RMSNorm's (1 + w)
        return
    yield _mapped(key, names), entry


def _qwen3_merger_name(key: str, projector: Projector) -> str:
    """Qwen3-VL's merger -> ``mm.0`` / ``mm.2`` / ``v.post_ln``; deepstack merger ``i`` ->
    ``v.deepstack.{vision layer it follows}``."""
    parts = key.split(".")
    if parts[1] == "merger":
        module, tail = parts[2], ".".join(parts[3:])
        prefix = {"linear_fc1": "mm.0", "linear_fc2": "mm.2", "norm": "v.post_ln"}.get(module)
    else:
        layer = projector.vision.deepstack_visual_indexes[int(parts[2])]
        module, tail = parts[3], ".".join(parts[4:])
        prefix = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}.get(module)
        prefix = prefix and f"v.deepstack.{layer}.{prefix}"
    if prefix is None:
        raise ValueError(f"Unexpected Qwen3-VL merger tensor {key!r}; llama.cpp has no counterpart for it.")
    return f"{prefix}.{tail}"


def _mapped(key: str, names) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"Vision tensor {key!r} has no counterpart in llama.cpp's projector (mmproj) format; "
                         "this checkpoint cannot be exported to GGUF.")
    return name


def _derived(entry: TensorEntry, shape: tuple[int, ...], transform) -> TensorEntry:
    return TensorEntry(entry.key, tuple(shape), entry.dtype, lambda: transform(entry.load()).contiguous())


def _tensor_type(key: str, name: str, shape: tuple[int, ...], ftype: gguf.LlamaFileType) -> T:
    """The converter's choice: its per-family overrides, then F32 for what is not a matrix."""
    forced = _forced_type(key, name, ftype)
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if forced is not None:
        return forced
    if name == "v.position_embd.weight" or not name.endswith(".weight"):
        return T.F32
    return T.F16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else T.BF16


def _forced_type(key: str, name: str, ftype: gguf.LlamaFileType) -> T | None:
    if "input_projection" in key:  # Gemma 3 (llama.cpp issue #13025)
        return T.F16
    if ".embeddings." in key:  # Gemma 3's SigLIP patch and position embeddings
        return T.F32
    if ".position_embd." in name:
        return T.F32
    if ".patch_embd.weight" in name:
        return T.F16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else T.F32
    return None


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    block = int(parts[2]) if len(parts) > 2 and parts[1] in ("blk", "deepstack") and parts[2].isdigit() else -1
    return (block, name)


def projector_output(path, projector: Projector, plan: list[PlannedTensor], name: str,
                     ftype: gguf.LlamaFileType) -> OutputFile:
    return OutputFile(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], header(projector, name, ftype), plan)


def projector_file_type(entries: list[TensorEntry]) -> gguf.LlamaFileType:
    """BF16 for a bfloat16 checkpoint (no precision is lost), F16 otherwise (float16 as it is;
    float32 vision weights, which are small in range, keep 3 more mantissa bits than in BF16)."""
    floating = [e.dtype for e in entries if e.dtype.is_floating_point]
    if floating and all(d == torch.bfloat16 for d in floating):
        return gguf.LlamaFileType.MOSTLY_BF16
    return gguf.LlamaFileType.MOSTLY_F16
