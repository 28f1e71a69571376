"""GGUF + mmproj export of vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3),
checked against what llama.cpp's converter writes and by llama.cpp itself (libmtmd through
llama-cpp-python, the gguf-check extra; those tests skip without it).

llama.cpp runs the files like transformers runs the checkpoint: the text-only logits of the F32
language model, the projector's image embeddings and the logits after an image prompt (the same
pixels, token layout and M-RoPE positions on both sides) agree to the rounding of the F16
projector weights, and the first greedy token is the same.

Image sizes are chosen so that neither side resizes: llama.cpp's Qwen-VL projector wants at
least 8 image tokens and the zoo processors allow at most 16. Qwen2.5-VL is checked on a copy of
the zoo model with the published models' 112-pixel attention window, the only one llama.cpp runs
(the zoo's own window of 56 is refused, see ``test_refusals``); the 224x56 image spans two windows.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import importlib.util
import io
import json
import logging
import types

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from unsloth_like.save.gguf import convert, save_pretrained_gguf
from unsloth_like.testing import llamacpp
from unsloth_like.testing.processors import chat_messages, make_images
from unsloth_like.testing.zoo import ZOO, zoo_model_dir

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason=f"needs llama-cpp-python: {llamacpp.INSTALL_HINT}")


@dataclasses.dataclass(frozen=True)
class Family:
    arch: str  # the language model's llama.cpp architecture
    projector: str  # clip.projector_type
    image: tuple[int, int]  # (width, height) that neither llama.cpp nor the processor resizes
    placeholder: str  # what the chat template renders for an image; libmtmd adds its own
    sections: list[int] | None  # rope.dimension_sections


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
FAMILIES = {
    "qwen2_vl": Family("qwen2vl", "qwen2vl_merger", (112, 56), _QWEN_IMAGE, [8, 8, 8, 0]),
    "qwen2_5_vl": Family("qwen2vl", "qwen2.5vl_merger", (224, 56), _QWEN_IMAGE, [6, 8, 8, 0]),
    "qwen3_vl": Family("qwen3vl", "qwen3vl_merger", (128, 64), _QWEN_IMAGE, [12, 10, 10, 0]),
    "gemma3": Family("gemma3", "gemma3", (56, 56), "<start_of_image>", None),
}
# |Δ logit| bounds for the F32 language model alone, measured 1e-6 (Qwen), 3e-4 (Gemma 3: ggml's GELU
# goes through an F16 lookup table). Qwen2/2.5-VL: the llama.cpp in llama-cpp-python 0.3.36 ignores
# qwen2vl.attention.layer_norm_rms_epsilon and normalises without an epsilon (writing 1e-2 there changes
# nothing), which on these tiny-activation models moves logits by ~2e-3; so they are compared with
# transformers at rms_norm_eps=0 as well as at the config's 1e-6 (which the file holds, test_metadata),
# and one of the two must agree.
TEXT_BOUND = {"qwen2_vl": 1e-4, "qwen2_5_vl": 1e-4, "qwen3_vl": 1e-4, "gemma3": 1e-3}
# After an image: the projector's weights are F16 (relative rounding 2^-11), measured 2e-4..8e-4.
EMBEDDING_BOUND, IMAGE_LOGIT_BOUND = 1e-3, 2e-3
TEXT = "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it? " * 3  # > Gemma's window of 16


def _model_dir(name: str, cache):
    if name != "qwen2_5_vl":
        return zoo_model_dir(name, cache)
    spec = ZOO[name]
    config = copy.deepcopy(spec.config)
    config["vision_config"]["window_size"] = 112
    return zoo_model_dir(dataclasses.replace(spec, name="qwen2_5_vl_window112", config=config), cache)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, zoo_cache):
    """``exported(name)`` -> ``(text F32 GGUF, mmproj GGUF)`` of the zoo model, converted once."""
    root, cache = tmp_path_factory.mktemp("vlm-gguf"), {}

    def get(name: str):
        if name not in cache:
            text, mmproj = convert(_model_dir(name, zoo_cache), root / name, "f32")
            cache[name] = text, mmproj
        return cache[name]
    return get


@pytest.fixture(scope="module")
def hf(zoo_cache):
    """``hf(name, rms_norm_eps=None)`` -> ``(model, processor)`` with plain transformers."""
    cache: dict = {}

    def get(name: str, rms_norm_eps: float | None = None):
        if (name, rms_norm_eps) not in cache:
            directory = _model_dir(name, zoo_cache)
            config = transformers.AutoConfig.from_pretrained(directory)
            if rms_norm_eps is not None:
                config.get_text_config().rms_norm_eps = rms_norm_eps
            model = transformers.AutoModelForImageTextToText.from_pretrained(directory, config=config,
                                                                             dtype=torch.float32).eval()
            cache[name, rms_norm_eps] = model, transformers.AutoProcessor.from_pretrained(directory)
        return cache[name, rms_norm_eps]
    return get


def _fields(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _checkpoint(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# --- the files, as llama.cpp's converter writes them --------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_metadata(name, exported, hf):
    family, (text, mmproj) = FAMILIES[name], exported(name)
    model, processor = hf(name)
    config, vision = model.config, model.config.vision_config
    assert text.name.endswith(".F32.gguf") and mmproj.name.endswith(".F16-mmproj.gguf")  # zoo weights are float32
    fields = _fields(text)
    arch = family.arch
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.get_text_config().rms_norm_eps)
    assert fields.get(f"{arch}.rope.dimension_sections") == family.sections
    assert fields["tokenizer.chat_template"] == processor.chat_template
    if name == "qwen3_vl":
        assert fields["qwen3vl.n_deepstack_layers"] == len(vision.deepstack_visual_indexes)
    if name == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == 16
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]  # layer_types
        assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)

    clip = _fields(mmproj)
    assert (clip["general.architecture"], clip["general.type"], clip["clip.projector_type"]) == ("clip", "mmproj",
                                                                                                 family.projector)
    assert clip["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16 and clip["clip.has_vision_encoder"] is True
    image_processor = processor.image_processor
    assert clip["clip.vision.image_mean"] == pytest.approx(image_processor.image_mean)
    assert clip["clip.vision.image_std"] == pytest.approx(image_processor.image_std)
    assert clip["clip.vision.projection_dim"] == config.get_text_config().hidden_size
    assert clip["clip.vision.patch_size"] == vision.patch_size
    assert clip["clip.vision.block_count"] == 2
    expected = {
        "qwen2_vl": {"clip.vision.image_size": 560, "clip.vision.embedding_length": 64,
                     "clip.vision.feed_forward_length": 192},  # the converter's hidden_size quirk for Qwen2-VL
        "qwen2_5_vl": {"clip.vision.n_wa_pattern": 2, "clip.use_silu": True, "clip.vision.feed_forward_length": 112},
        "qwen3_vl": {"clip.vision.image_size": 96, "clip.use_gelu": True, "clip.vision.spatial_merge_size": 2,
                     "clip.vision.is_deepstack_layers": [True, False]},
        "gemma3": {"clip.vision.image_size": 56, "clip.use_gelu": True, "clip.vision.projector.scale_factor": 2},
    }[name]
    assert {key: clip.get(key) for key in expected} == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_tensors(name, exported, zoo_cache):
    """Names, shapes, types and values against the checkpoint, family by family."""
    text, mmproj = exported(name)
    hf = _checkpoint(_model_dir(name, zoo_cache))
    ours = _tensors(mmproj)
    values = {key: np.asarray(tensor.data) for key, tensor in ours.items()}
    types_ = {key: tensor.tensor_type.name for key, tensor in ours.items()}
    assert all(types_[key] == "F32" for key in ours if len(values[key].shape) == 1 or key.endswith(".bias"))
    if name.startswith("qwen"):
        prefix = "model.visual." if name == "qwen3_vl" else "visual."
        conv = hf[prefix + "patch_embed.proj.weight"].numpy()  # (out, in, time=2, h, w)
        assert np.array_equal(values["v.patch_embd.weight"], conv[:, :, 0].astype(np.float16))
        assert np.array_equal(values["v.patch_embd.weight.1"], conv[:, :, 1].astype(np.float16))
        qkv = hf[prefix + "blocks.1.attn.qkv.weight"].numpy().astype(np.float16)
        if name == "qwen3_vl":  # llama.cpp's Qwen3-VL graph takes the fused projection
            assert np.array_equal(values["v.blk.1.attn_qkv.weight"], qkv) and "v.blk.1.attn_q.weight" not in ours
            assert np.array_equal(values["mm.2.weight"], hf["model.visual.merger.linear_fc2.weight"].half().numpy())
            assert np.array_equal(values["v.deepstack.0.fc1.weight"],
                                  hf["model.visual.deepstack_merger_list.0.linear_fc1.weight"].half().numpy())
            assert types_["v.position_embd.weight"] == "F32"
        else:
            for i, part in enumerate("qkv"):
                assert np.array_equal(values[f"v.blk.1.attn_{part}.weight"], np.split(qkv, 3)[i])
            assert "v.blk.1.attn_qkv.weight" not in ours
            assert np.array_equal(values["mm.0.weight"], hf["visual.merger.mlp.0.weight"].half().numpy())
        assert types_["v.blk.0.ffn_down.weight"] == "F16"
    else:
        norm = hf["multi_modal_projector.mm_soft_emb_norm.weight"].numpy()
        assert np.array_equal(values["mm.soft_emb_norm.weight"], norm + 1)  # Gemma3RMSNorm's (1 + w)
        assert types_["mm.input_projection.weight"] == "F16"
        assert np.array_equal(values["mm.input_projection.weight"],
                              hf["multi_modal_projector.mm_input_projection_weight"].half().numpy())
        assert types_["v.patch_embd.weight"] == types_["v.position_embd.weight"] == "F32"  # SigLIP embeddings
        assert np.array_equal(values["v.blk.1.attn_q.weight"],
                              hf["vision_tower.encoder.layers.1.self_attn.q_proj.weight"].half().numpy())
        language = _tensors(text)  # norms stored as w + 1, as llama.cpp's converter writes them
        assert np.array_equal(np.asarray(language["blk.0.post_attention_norm.weight"].data),
                              hf["language_model.model.layers.0.post_attention_layernorm.weight"].numpy() + 1)
        assert np.array_equal(np.asarray(language["blk.1.attn_q_norm.weight"].data),
                              hf["language_model.model.layers.1.self_attn.q_norm.weight"].numpy() + 1)
    vision_keys = [k for k in hf if k.startswith(("visual.", "model.visual.", "vision_tower.", "multi_modal"))]
    # qkv weight and bias -> 3 each, in 2 blocks; the Conv3D patch embedding -> 2 frames
    split = {"qwen2_vl": 2 * 2 * 2 + 1, "qwen2_5_vl": 2 * 2 * 2 + 1, "qwen3_vl": 1, "gemma3": 0}[name]
    assert len(ours) == len(vision_keys) + split
    assert len(_tensors(text)) == len(hf) - len(vision_keys)  # every other tensor, once (tied heads are not stored)


# --- llama.cpp runs them ----------------------------------------------------------------------------


def _hf_batch(config, processor, layout, image) -> dict:
    """The token ids libmtmd laid out, with transformers' image placeholder where it put the image."""
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    ids = [t for kind, value in layout for t in (value if kind == "text" else [image_id] * value[0])]
    input_ids = torch.tensor([ids])
    pixels = dict(processor.image_processor(images=[image], return_tensors="pt"))
    pixels.pop("num_crops", None)
    modality = "token_type_ids" if config.model_type == "gemma3" else "mm_token_type_ids"
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            modality: (input_ids == image_id).long(), **pixels}


def _prompt(name: str, processor) -> str:
    rendered = processor.apply_chat_template(chat_messages("Describe."), tokenize=False, add_generation_prompt=True)
    assert FAMILIES[name].placeholder in rendered
    return rendered.replace(FAMILIES[name].placeholder, llamacpp.media_marker())


def _hf_image_features(model, batch) -> np.ndarray:
    pixels = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        out = model.model.get_image_features(**pixels)
    def rows(x):  # per-image tuples/lists of features -> one (tokens, width) matrix
        x = torch.cat([rows(part) for part in x]) if isinstance(x, (list, tuple)) else x
        return x.reshape(-1, x.shape[-1])

    levels = [out.pooler_output if hasattr(out, "pooler_output") else out]
    levels += list(getattr(out, "deepstack_features", None) or [])  # Qwen3-VL: then each deepstack level
    return torch.cat([rows(level) for level in levels], dim=-1).float().numpy()


@needs_llama_cpp
@pytest.mark.parametrize("name", FAMILIES)
def test_text_logits_equal_transformers(name, exported, hf):
    processor = hf(name)[1]
    ids = processor.tokenizer(TEXT).input_ids
    with llamacpp.load(exported(name)[0]) as llm:
        assert llamacpp.tokenize(llm, TEXT, add_bos=ids[0] == processor.tokenizer.bos_token_id) == ids
        ours = llamacpp.logits(llm, ids)
    differences = []
    for eps in [None, 0.0] if FAMILIES[name].arch == "qwen2vl" else [None]:
        with torch.no_grad():
            expected = hf(name, rms_norm_eps=eps)[0](input_ids=torch.tensor([ids])).logits[0].numpy()
        differences.append(np.abs(ours - expected).max())
    assert len(ids) > 40 and min(differences) <= TEXT_BOUND[name]


@needs_llama_cpp
@pytest.mark.parametrize("name", FAMILIES)
def test_image_prompt_predicts_like_transformers(name, exported, hf):
    """libmtmd's image embeddings equal transformers' image features, and the logits after an
    image prompt (the whole chat turn: image chunk, M-RoPE positions, Gemma's bidirectional image
    attention) equal transformers' logits; another image moves them far more than that."""
    model, processor = hf(name)
    image, other = make_images(2, FAMILIES[name].image)
    prompt = _prompt(name, processor)
    with llamacpp.load_multimodal(*exported(name)) as (llm, ctx):
        layout = llamacpp.multimodal_prompt(llm, ctx, prompt, image)
        embeddings = llamacpp.image_embeddings(llm, ctx, image)
        ours = llamacpp.multimodal_logits(llm, ctx, prompt, image)
        with_other = llamacpp.multimodal_logits(llm, ctx, prompt, other)
        generated = llamacpp.generate_with_image(llm, ctx, prompt, image, max_tokens=3)
    batch = _hf_batch(model.config, processor, layout, image)
    features = _hf_image_features(model, batch)
    assert embeddings.shape == features.shape  # the same number of image tokens, the same width
    assert np.abs(embeddings - features).max() <= EMBEDDING_BOUND
    with torch.no_grad():
        expected = model(**batch).logits[0, -1].numpy()
    assert np.abs(ours - expected).max() <= IMAGE_LOGIT_BOUND
    assert np.abs(with_other - ours).max() > 10 * IMAGE_LOGIT_BOUND
    assert len(generated) == 3 and generated[0] == int(expected.argmax())


@needs_llama_cpp
@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_mtmd_chat_handler_generates_from_a_png(name, exported):
    """The user-facing path: ``Llama(chat_handler=MTMDChatHandler(clip_model_path=mmproj))`` with
    the GGUF's own chat template and an image_url part."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    text, mmproj = exported(name)
    png = io.BytesIO()
    make_images(1, FAMILIES[name].image)[0].save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    llm = Llama(model_path=str(text), chat_handler=MTMDChatHandler(clip_model_path=str(mmproj), verbose=False,
                                                                     use_gpu=False),
                n_ctx=512, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]}],
            max_tokens=3, temperature=0.0)
    finally:
        llm.close()
    # three tokens generated (usage re-tokenises the decoded text, so it may count other pieces)
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["prompt_tokens"] > 8


# --- save_pretrained_gguf on a LoRA model, methods, dtypes -------------------------------------------


@needs_llama_cpp
def test_lora_model_exports_text_and_projector(tmp_path, zoo_cache, caplog):
    """``model.save_pretrained_gguf(dir, processor)`` on ``FastVisionModel.get_peft_model``:
    the LoRA (language and vision layers) is merged into both files, which predict like the
    PEFT model; the Modelfile names the text GGUF and a note says how Ollama takes vision models.
    Converting the ``save_pretrained_merged`` directory instead gives the same tensors."""
    from unsloth_like import FastVisionModel

    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(str(zoo_model_dir("qwen2_vl", zoo_cache)), load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any("visual" in n and "lora_B" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        for parameter in lora:
            parameter.normal_(0.0, 0.05)
    with caplog.at_level(logging.WARNING):
        paths = model.save_pretrained_gguf(tmp_path / "out", processor, quantization_method=["f32", "q8_0"])
    assert [p.name for p in paths] == ["out.F32.gguf", "out.Q8_0.gguf", "out.F16-mmproj.gguf"]
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./out.F32.gguf")
    assert "Ollama imports vision models from the merged safetensors directory" in caplog.text
    model.eval()
    image = make_images(1, FAMILIES["qwen2_vl"].image, seed=3)[0]
    prompt = _prompt("qwen2_vl", processor)
    with llamacpp.load_multimodal(paths[0], paths[2]) as (llm, ctx):
        layout = llamacpp.multimodal_prompt(llm, ctx, prompt, image)
        ours = llamacpp.multimodal_logits(llm, ctx, prompt, image)
    batch = _hf_batch(model.config, processor, layout, image)
    with torch.no_grad():
        expected = model(**batch).logits[0, -1].float().numpy()
    assert np.abs(ours - expected).max() <= IMAGE_LOGIT_BOUND and ours.argmax() == expected.argmax()

    model.save_pretrained_merged(tmp_path / "merged", processor)
    again = convert(tmp_path / "merged", tmp_path / "converted" / "merged.F32.gguf", "f32")
    assert [p.name for p in again] == ["merged.F32.gguf", "merged.F16-mmproj.gguf"]
    for ours_path, theirs_path in ((paths[0], again[0]), (paths[2], again[1])):
        theirs = _tensors(theirs_path)
        assert all(np.array_equal(np.asarray(t.data), np.asarray(theirs[n].data))
                   for n, t in _tensors(ours_path).items())
        assert len(theirs) == len(_tensors(ours_path))


@needs_llama_cpp
def test_every_method_gets_one_text_file_and_the_same_projector(tmp_path, exported, zoo_cache):
    paths = convert(zoo_model_dir("qwen3_vl", zoo_cache), tmp_path, ["q4_k_m", "bf16"])
    assert [p.name.split(".", 1)[1] for p in paths] == ["Q4_K_M.gguf", "BF16.gguf", "F16-mmproj.gguf"]
    assert [_fields(p)["general.file_type"] for p in paths[:2]] == [gguf.LlamaFileType.MOSTLY_Q4_K_M,
                                                                     gguf.LlamaFileType.MOSTLY_BF16]
    reference = _tensors(exported("qwen3_vl")[1])
    assert all(np.array_equal(np.asarray(t.data), np.asarray(reference[n].data)) for n, t in _tensors(paths[2]).items())
    image = make_images(1, FAMILIES["qwen3_vl"].image)[0]
    with llamacpp.load_multimodal(paths[0], paths[2]) as (llm, ctx):
        tokens = llamacpp.generate_with_image(llm, ctx, llamacpp.media_marker() + "Describe.", image, max_tokens=2)
    assert len(tokens) == 2


def test_bfloat16_checkpoint_gets_a_bf16_projector(tmp_path, zoo_cache):
    """As llama.cpp's converter types a BF16 file: matrices BF16, the patch embedding F32 (it is
    F16 only in an F16 file), 1-D tensors and position embeddings F32."""
    source = zoo_model_dir("qwen3_vl", zoo_cache)
    model = transformers.AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    processor = transformers.AutoProcessor.from_pretrained(source)
    text, mmproj = convert(tmp_path / "bf16", tmp_path / "out", "q8_0", tokenizer=processor)
    assert mmproj.name.endswith(".BF16-mmproj.gguf")
    assert _fields(mmproj)["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    types_ = {name: t.tensor_type.name for name, t in _tensors(mmproj).items()}
    assert types_["v.blk.0.attn_qkv.weight"] == types_["mm.0.weight"] == "BF16"
    assert types_["v.patch_embd.weight"] == types_["v.patch_embd.weight.1"] == "F32"
    assert types_["v.position_embd.weight"] == types_["v.blk.0.ln1.weight"] == "F32"


# --- refused before any work -------------------------------------------------------------------------


def _fake_model(config):
    return types.SimpleNamespace(config=config)  # no weights, no adapter: nothing may be touched


def test_refusals(tmp_path, zoo_cache):
    with pytest.raises(ValueError, match="no converter or architecture for MllamaForConditionalGeneration"):
        save_pretrained_gguf(_fake_model(transformers.MllamaConfig()), tmp_path / "a", tokenizer=None)
    with pytest.raises(ValueError, match="no recipe for the vision-language model type 'llava'"):
        save_pretrained_gguf(_fake_model(transformers.LlavaConfig()), tmp_path / "b", tokenizer=None)
    # convert: a checkpoint directory of Llama 3.2 Vision, refused from its config alone
    mllama = tmp_path / "mllama"
    mllama.mkdir()
    (mllama / "config.json").write_text(json.dumps(transformers.MllamaConfig().to_dict()))
    save_file({"x": torch.zeros(1)}, str(mllama / "model.safetensors"))
    with pytest.raises(ValueError, match="save_pretrained_merged"):
        convert(mllama, tmp_path / "c", "q8_0")
    # llama.cpp's Qwen2.5-VL runs a fixed 112-pixel attention window; the zoo model has 56
    with pytest.raises(ValueError, match="fixed 112-pixel attention window"):
        convert(zoo_model_dir("qwen2_5_vl", zoo_cache), tmp_path / "d", "q8_0")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")


def test_existing_files_are_refused(tmp_path, zoo_cache):
    directory = zoo_model_dir("gemma3", zoo_cache)
    text, mmproj = convert(directory, tmp_path, "q8_0", modelfile=False)
    text.unlink()  # only the projector is left: still refused, and nothing is written
    with pytest.raises(FileExistsError, match="mmproj"):
        convert(directory, tmp_path, "q8_0", modelfile=False)
    assert not text.exists()
    assert [p.name for p in convert(directory, tmp_path, "q8_0", modelfile=False, overwrite=True)] == [
        text.name, mmproj.name]


@needs_llama_cpp
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "gemma3"])  # the three architectures; small vocabularies
def test_every_method_is_what_llama_quantize_writes(name, tmp_path, exported, zoo_cache):
    """The language model in every method, one pass: tensor for tensor the types and bytes of
    llama.cpp's own quantiser (``llama-quantize``) run on our F32 file (these odd widths exercise
    its fallback types)."""
    from unsloth_like.save.gguf import METHODS

    methods = [m for m in METHODS if m != "f32"]
    *texts, _ = convert(_model_dir(name, zoo_cache), tmp_path / "out", methods, modelfile=False)
    for method, path in zip(methods, texts):
        reference = tmp_path / f"{method}.gguf"
        llamacpp.quantize_file(exported(name)[0], reference, METHODS[method][0])
        ours, theirs = _tensors(path), _tensors(reference)
        assert list(ours) == list(theirs), method
        for tensor_name, tensor in ours.items():
            assert tensor.tensor_type == theirs[tensor_name].tensor_type, (method, tensor_name)
            assert np.array_equal(np.asarray(tensor.data).view(np.uint8),
                                  np.asarray(theirs[tensor_name].data).view(np.uint8)), (method, tensor_name)
