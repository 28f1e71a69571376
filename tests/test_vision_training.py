"""FastVisionModel end to end on CPU: load, LoRA/QLoRA, the notebooks' SFTTrainer call, TRL's own
VLM path, adapter save and reload, generation with images."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from datasets import Dataset

from unsloth_like import FastLanguageModel, FastModel, FastVisionModel, UnslothVisionDataCollator
from unsloth_like.kernels import use_backend
from unsloth_like.models import is_patched
from unsloth_like.responses_only import train_on_responses_only
from unsloth_like.testing.processors import make_images
from unsloth_like.testing.zoo import zoo_model_dir

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _caption_data(repeat=4):
    from PIL import Image

    data = []
    for name, rgb in COLOURS.items():
        image = Image.new("RGB", (56, 56), rgb)
        data.append({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Which colour is this?"},
                                         {"type": "image", "image": image}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]})
    return data * repeat


def _notebook_config(tmp_path, steps, **overrides):
    from trl import SFTConfig

    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, max_steps=steps,
                    learning_rate=2e-3, logging_steps=1, optim="adamw_torch", weight_decay=0.001,
                    lr_scheduler_type="linear", seed=3407, output_dir=str(tmp_path / "outputs"), report_to="none",
                    remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                    max_length=2048)
    settings.update(overrides)
    return SFTConfig(**settings)


def _load(name, zoo_cache, **kwargs):
    return FastVisionModel.from_pretrained(str(zoo_model_dir(name, zoo_cache)), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name, load_in_4bit", [("qwen2_vl", True), ("gemma3", False)])
def test_the_notebook_finetune_lowers_the_loss(name, load_in_4bit, zoo_cache, tmp_path):
    from trl import SFTTrainer

    model, tokenizer = _load(name, zoo_cache, load_in_4bit=load_in_4bit, use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=16, lora_dropout=0, bias="none", random_state=3407,
                                           use_rslora=False, loftq_config=None)
    FastVisionModel.for_training(model)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, data_collator=UnslothVisionDataCollator(model, tokenizer),
                         train_dataset=_caption_data(), args=_notebook_config(tmp_path, steps=16, learning_rate=5e-3))
    with use_backend("torch"):  # many steps: the plumbing is checked here, the kernels elsewhere
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses  # tiny random models: ~0.85 here


def test_the_collator_sets_what_the_notebooks_set_by_hand(zoo_cache, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, processor = _load("qwen2_vl", zoo_cache, load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4)
    plain = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                      max_seq_length=512)  # the legacy name the seed tests use
    assert plain.max_length == 512
    trainer = SFTTrainer(model=model, processing_class=processor, train_dataset=_caption_data(1),
                         data_collator=UnslothVisionDataCollator(model, processor), args=plain)
    assert trainer.args.remove_unused_columns is False and trainer.args.dataset_text_field == ""
    assert trainer.args.dataset_kwargs["skip_prepare_dataset"] is True
    assert plain.remove_unused_columns is True  # the user's config is not modified
    trainer.train()
    with pytest.raises(ValueError, match=r"packing=True\) cannot be used with UnslothVisionDataCollator"):
        SFTTrainer(model=model, processing_class=processor, train_dataset=_caption_data(1),
                   data_collator=UnslothVisionDataCollator(model, processor),
                   args=_notebook_config(tmp_path, steps=1, packing=True))
    with pytest.raises(ValueError, match="give it once, as max_length="):
        SFTConfig(output_dir=str(tmp_path), max_seq_length=512, max_length=256)


def test_train_on_responses_only_switches_the_collator(zoo_cache, tmp_path):
    from trl import SFTTrainer

    model, processor = _load("qwen2_vl", zoo_cache, load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=UnslothVisionDataCollator(model, processor),
                         train_dataset=_caption_data(1), args=_notebook_config(tmp_path, steps=1))
    train_on_responses_only(trainer, instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
    batch = trainer.data_collator(list(trainer.train_dataset)[:2])
    kept = processor.tokenizer.decode([int(t) for t in batch["labels"][0] if t != -100])
    assert kept.startswith("It is red.") and "colour" not in kept


def test_trls_own_vision_path_trains_our_model(zoo_cache, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, processor = _load("qwen2_vl", zoo_cache, load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4)
    images = make_images(4)
    dataset = Dataset.from_list([{"images": [image], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]}]} for image in images])
    trainer = SFTTrainer(model=model, processing_class=processor, train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                        max_length=None, report_to="none", learning_rate=1e-3))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("name", ["qwen2_vl", "mllama"])
def test_adapter_directories_reload_as_base_plus_adapter(name, zoo_cache, tmp_path):
    from unsloth_like.testing.processors import vlm_chat_batch

    model, processor = _load(name, zoo_cache, load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False)
    for parameter_name, parameter in model.named_parameters():  # a trained adapter: non-zero B
        if "lora_B" in parameter_name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.save_pretrained(tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")
    reloaded, reloaded_processor = FastVisionModel.from_pretrained(str(tmp_path / "lora"), load_in_4bit=False)
    assert isinstance(reloaded, peft.PeftModel) and is_patched(reloaded)
    assert getattr(reloaded_processor, "image_processor", None) is not None
    batch = vlm_chat_batch(processor, 1)
    FastVisionModel.for_inference(model), FastVisionModel.for_inference(reloaded)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)


def test_generate_with_an_image_after_for_inference(zoo_cache):
    from unsloth_like.testing.processors import vlm_chat_batch

    model, processor = _load("gemma3", zoo_cache, load_in_4bit=False, dtype=torch.bfloat16)
    model = FastVisionModel.get_peft_model(model, r=4)
    FastVisionModel.for_inference(model)
    assert processor.tokenizer.padding_side == "left"
    batch = vlm_chat_batch(processor, 1, with_answer=False, add_generation_prompt=True)
    assert batch["pixel_values"].dtype == torch.float32  # the processor's; generate casts to bf16
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    encoded = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": make_images(1)[0]},
                                      {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert model.generate(input_ids=encoded, max_new_tokens=2).shape[1] == encoded["input_ids"].shape[1] + 2
    FastVisionModel.for_training(model)
    assert processor.tokenizer.padding_side == "right"


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_qlora_keeps_projectors_in_16_bit_and_trains(name, zoo_cache):
    import bitsandbytes as bnb

    from unsloth_like.testing.processors import vlm_chat_batch

    model, processor = _load(name, zoo_cache, load_in_4bit=True)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and not any(re.search(r"merger|multi_modal_projector|vision_tower|lm_head", n) for n in quantised)
    assert any(n.startswith("model.language_model.") for n in quantised)
    model = FastVisionModel.get_peft_model(model, r=4)
    model.train()
    batch = vlm_chat_batch(processor, 2, labels=True)
    loss = model(**batch).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert torch.isfinite(loss) and lora_grads and all(g is not None for g in lora_grads)


def test_loaders_refuse_or_route_what_they_cannot_handle(zoo_cache):
    with pytest.raises(ValueError, match="is a text-only model .*load it with FastLanguageModel"):
        FastVisionModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)))
    model, processor = FastModel.from_pretrained(str(zoo_model_dir("gemma3", zoo_cache)), load_in_4bit=False)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and not is_patched(model)
    assert processor.eos_token == processor.tokenizer.eos_token and processor.pad_token_id is not None
    model, processor = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2_vl", zoo_cache)), load_in_4bit=False)
    assert is_patched(model) and getattr(processor, "image_processor", None) is not None


def test_get_peft_model_flags_and_errors(zoo_cache):
    model, _ = _load("mllama", zoo_cache, load_in_4bit=False)
    with pytest.raises(ValueError, match="both False"):
        FastVisionModel.get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    peft_model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False, finetune_mlp_modules=False,
                                                finetune_last_n_layers=2)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted and all(".language_model.layers." in n and ("attn" in n) for n in adapted)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in adapted} == {1, 2}
    assert not any("multi_modal_projector" in n or "lm_head" in n for n in adapted)


def test_missing_pillow_names_the_extra_before_loading(zoo_cache, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    with pytest.raises(ImportError, match=r'need Pillow .*pip install "unsloth_like\[vision\]"'):
        _load("qwen2_vl", zoo_cache, load_in_4bit=False)


def test_a_processor_import_error_names_the_extra(zoo_cache, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    with pytest.raises(ImportError, match=r"requires the Torchvision library.*unsloth_like\[vision\]"):
        _load("qwen2_vl", zoo_cache, load_in_4bit=False)


def test_generate_inputs_keep_what_each_forward_takes(zoo_cache):
    from unsloth_like.models.vision import adapt_vision_inputs

    pixels = torch.zeros(2, 3)
    ids = torch.zeros(1, 4, dtype=torch.long)
    for name, kept in (("qwen2_vl", {"mm_token_type_ids"}), ("gemma3", {"token_type_ids"}), ("mllama", set())):
        model, _ = _load(name, zoo_cache, load_in_4bit=False, dtype=torch.bfloat16)
        adapted = adapt_vision_inputs(model, {"input_ids": ids, "pixel_values": pixels, "token_type_ids": ids,
                                              "mm_token_type_ids": ids})
        assert adapted["pixel_values"].dtype == torch.bfloat16 and adapted["input_ids"].dtype == torch.long
        assert {"token_type_ids", "mm_token_type_ids"} & set(adapted) == kept, name


def test_gemma3_defaults_to_fp32_where_the_gpu_would_give_fp16():
    import transformers

    from unsloth_like.models.loader import _family_dtype

    gemma = transformers.Gemma3Config(text_config={"num_hidden_layers": 1}, vision_config={"num_hidden_layers": 1})
    assert _family_dtype(gemma, torch.float16) is torch.float32  # a T4: no bf16
    assert _family_dtype(gemma, torch.bfloat16) is torch.bfloat16
    assert _family_dtype(transformers.Qwen2Config(), torch.float16) is torch.float16


def test_directories_with_unsloths_patched_processor_class_load(zoo_cache, tmp_path):
    import json
    import shutil

    source = zoo_model_dir("qwen2_vl", zoo_cache)
    shutil.copytree(source, tmp_path / "old_unsloth_save")
    config_file = tmp_path / "old_unsloth_save" / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "_Unsloth_Patched_Qwen2VLProcessor"
    config_file.write_text(json.dumps(config))
    _, processor = FastVisionModel.from_pretrained(str(tmp_path / "old_unsloth_save"), load_in_4bit=False)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.image_processor is not None
    assert "_Unsloth_Patched_" in config_file.read_text()  # the user's files are left as they were
