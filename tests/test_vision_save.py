"""Merged saves of vision-language models: original key names, byte-identical vision tensors,
every processor file, and a reload by plain transformers that gives the LoRA model's logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from unsloth_like import FastVisionModel
from unsloth_like.testing.processors import vlm_chat_batch
from unsloth_like.testing.zoo import zoo_model_dir

PROCESSOR_FILES = {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja"}
LANGUAGE_PREFIXES = ("model.layers.", "language_model.model.layers.", "model.language_model.layers.")


def _tensors(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _trained_lora(name, zoo_cache, **flags):
    model, processor = FastVisionModel.from_pretrained(str(zoo_model_dir(name, zoo_cache)), load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, **flags)
    generator = torch.Generator().manual_seed(0)
    for parameter_name, parameter in model.named_parameters():
        if "lora_B" in parameter_name:  # as after training: the merge must change the weights
            with torch.no_grad():
                parameter.normal_(std=0.05, generator=generator)
    return model, processor


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "gemma3", "mllama"])
def test_merged_16bit_reloads_with_the_lora_models_logits(name, zoo_cache, tmp_path):
    model, processor = _trained_lora(name, zoo_cache)
    batch = vlm_chat_batch(processor, 2, image_sizes=(56, 56))
    expected = _logits(model, batch)
    target = model.save_pretrained_merged(tmp_path / "merged", processor)
    source = zoo_model_dir(name, zoo_cache)
    assert set(_tensors(target)) == set(_tensors(source))  # the checkpoint's own key names
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == [type(model.get_base_model()).__name__]
    assert config["architectures"][0].endswith("ForConditionalGeneration")
    assert PROCESSOR_FILES <= {p.name for p in target.iterdir()}
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(target)
    reloaded_processor = transformers.AutoProcessor.from_pretrained(target)
    assert type(reloaded_processor) is type(processor)
    assert torch.allclose(_logits(reloaded, batch), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_vision_tensors_are_byte_identical_when_only_language_layers_were_adapted(name, zoo_cache, tmp_path):
    model, processor = _trained_lora(name, zoo_cache, finetune_vision_layers=False)
    target = model.save_pretrained_merged(tmp_path / "merged", processor)
    merged, source = _tensors(target), _tensors(zoo_model_dir(name, zoo_cache))
    changed = {key for key in source if not torch.equal(merged[key], source[key])}
    assert changed and all(key.startswith(LANGUAGE_PREFIXES) for key in changed)
    vision = [key for key in source if "visual" in key or "vision" in key]
    assert vision and all(merged[key].dtype == source[key].dtype for key in vision)


def test_a_merge_from_memory_writes_the_checkpoint_names_too(zoo_cache, tmp_path):
    model, processor = _trained_lora("qwen2_vl", zoo_cache)
    batch = vlm_chat_batch(processor, 1)
    expected = _logits(model, batch)
    model.get_base_model().config._name_or_path = str(tmp_path / "gone")  # no local checkpoint to stream
    target = model.save_pretrained_merged(tmp_path / "merged", processor)
    assert set(_tensors(target)) == set(_tensors(zoo_model_dir("qwen2_vl", zoo_cache)))
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(target)
    assert torch.allclose(_logits(reloaded, batch), expected, atol=1e-5)


def test_a_4bit_lora_merges_onto_the_original_16bit_weights(zoo_cache, tmp_path):
    model, processor = FastVisionModel.from_pretrained(str(zoo_model_dir("qwen2_5_vl", zoo_cache)), load_in_4bit=True)
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False)
    target = model.save_pretrained_merged(tmp_path / "merged", processor)
    merged, source = _tensors(target), _tensors(zoo_model_dir("qwen2_5_vl", zoo_cache))
    assert set(merged) == set(source)
    # lora_B starts at zero: the merge is the original weights, not a dequantised 4-bit copy
    assert all(torch.equal(merged[key], source[key]) for key in source)


def test_merged_4bit_keeps_the_projector_unquantised(zoo_cache, tmp_path):
    model, processor = _trained_lora("qwen2_vl", zoo_cache, finetune_vision_layers=False)
    target = model.save_pretrained_merged(tmp_path / "merged4", processor, save_method="merged_4bit_forced")
    keys = set(_tensors(target))
    assert any(key.endswith(".quant_state.bitsandbytes__nf4") for key in keys)
    assert not any(key.startswith("visual.merger") and "quant_state" in key for key in keys)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(target)
    assert type(reloaded).__name__ == "Qwen2VLForConditionalGeneration"


def test_push_to_hub_merged_uploads_model_and_processor(zoo_cache, tmp_path):
    from .fake_hub import FakeHub

    model, processor = _trained_lora("qwen2_vl", zoo_cache)
    batch = vlm_chat_batch(processor, 1)
    expected = _logits(model, batch)
    with FakeHub() as hub:
        model.push_to_hub_merged("someone/qwen-vl-merged", processor, token="hf_fake", endpoint=hub.endpoint)
    files = hub.repos["someone/qwen-vl-merged"]
    assert PROCESSOR_FILES | {"config.json", "model.safetensors"} <= set(files)
    download = tmp_path / "download"
    download.mkdir()
    for name, data in files.items():
        (download / name).write_bytes(data)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(download)
    assert torch.allclose(_logits(reloaded, vlm_chat_batch(transformers.AutoProcessor.from_pretrained(download), 1)),
                          expected, atol=1e-5)
