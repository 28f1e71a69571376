"""The tiny-model zoo: real HF classes with awkward sizes, seeded, cached, with real tokenizers
and, for the vision-language models, real processors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from unsloth_like.testing.processors import chat_messages, make_images, vlm_chat_batch
from unsloth_like.testing.zoo import (
    ZOO,
    get_spec,
    load_zoo_model,
    make_vlm_inputs,
    zoo_model_dir,
)

TEXT_MODELS = [name for name, spec in ZOO.items() if not spec.is_vlm]
VLM_MODELS = [name for name, spec in ZOO.items() if spec.is_vlm]
QWEN_VLMS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
EXPECTED_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
}
# (processor, image processor, video processor) classes as AutoProcessor loads them.
EXPECTED_PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    "gemma3": ("Gemma3Processor", "Gemma3ImageProcessor", None),
    "mllama": ("MllamaProcessor", "MllamaImageProcessor", None),
}
ROUND_TRIP_TEXTS = [
    "Hello world!  Two spaces.",
    "Café, naïve — 机器学习 🙂 and 12345 digits.",
    "def f(x):\n\treturn x ** 2\n\n# done",
    "What is 17 plus 25?",
]


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def test_every_expected_architecture_is_in_the_zoo():
    assert set(ZOO) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_model_loads_with_auto_class_and_trains_on_cpu(name, zoo_cache):
    directory = zoo_model_dir(name, zoo_cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    model.train()
    batch = tokenizer(ROUND_TRIP_TEXTS[:2], return_tensors="pt", padding=True) if tokenizer.pad_token else \
        tokenizer(ROUND_TRIP_TEXTS[:1], return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    # Random init: the loss sits near ln(vocab).
    assert abs(out.loss.item() - math.log(model.config.vocab_size)) < 1.0
    out.loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


def test_sizes_are_deliberately_awkward():
    for spec in ZOO.values():
        text = spec.config.get("text_config", spec.config)
        assert not _is_power_of_two(text["hidden_size"]), spec.name
        assert text["num_key_value_heads"] < text["num_attention_heads"], f"{spec.name}: no GQA"
    llama = ZOO["llama"].config
    assert llama["vocab_size"] == 32003 and not llama["tie_word_embeddings"]
    for name in ("llama", "mistral", "qwen3"):
        cfg = ZOO[name].config
        assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"], name


def test_architecture_specific_features_are_present(zoo_cache):
    qwen2, _ = load_zoo_model("qwen2", cache_dir=zoo_cache)
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()
    qwen3, _ = load_zoo_model("qwen3", cache_dir=zoo_cache)
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")
    assert qwen3.lm_head.weight.data_ptr() != qwen3.model.embed_tokens.weight.data_ptr()
    llama, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    assert llama.model.layers[0].self_attn.k_proj.out_features == 48  # one KV head of dim 48


def test_builds_are_cached_atomic_and_seeded(zoo_cache, tmp_path):
    first = zoo_model_dir("qwen3", tmp_path)  # a private cache: other test workers build in the shared one
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert zoo_model_dir("qwen3", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging directory left behind
    rebuilt = zoo_model_dir("qwen3", zoo_cache)
    ours, theirs = load_file(first / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (first / "tokenizer.json").read_bytes() == (rebuilt / "tokenizer.json").read_bytes()


def test_cache_key_changes_with_the_config():
    import dataclasses

    spec = get_spec("llama")
    changed = dataclasses.replace(spec, config={**spec.config, "hidden_size": 208})
    assert spec.cache_key() != changed.cache_key()
    assert spec.cache_key() == get_spec("llama").cache_key()


def test_unknown_zoo_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown zoo model 'gpt5'; choose one of: llama, mistral"):
        zoo_model_dir("gpt5")


@pytest.mark.parametrize("name", list(ZOO))
def test_tokenizer_round_trips_and_agrees_with_the_config(name, zoo_cache):
    directory = zoo_model_dir(name, zoo_cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    text_config = config.get_text_config()
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert max(ids) < text_config.vocab_size
    assert text_config.eos_token_id == tokenizer.eos_token_id
    assert text_config.bos_token_id == tokenizer.bos_token_id
    assert text_config.pad_token_id == tokenizer.pad_token_id
    for token in tokenizer.all_special_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    if tokenizer.pad_token is not None:
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_bos_is_added_only_where_the_family_adds_it(zoo_cache):
    llama = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache))
    assert llama("hi")["input_ids"][0] == llama.convert_tokens_to_ids("<|begin_of_text|>")
    qwen = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("qwen2", zoo_cache))
    assert qwen.bos_token is None and "<|" not in qwen.decode(qwen("hi")["input_ids"])
    mistral = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("mistral", zoo_cache))
    assert mistral("hi")["input_ids"][0] == mistral.bos_token_id == 1
    assert mistral.pad_token is None  # as shipped by Mistral: the loader must supply one
    assert mistral.convert_ids_to_tokens(3) == "<0x00>"  # SentencePiece byte-fallback pieces


CHAT = [
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
]
RENDERED = {
    "llama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 2?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 2 is 4.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 plus 3?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] What is 2 plus 2? [/INST] 2 plus 2 is 4.</s>[INST] And 3 plus 3? [/INST]",
    "qwen2": "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n2 plus 2 is 4.<|im_end|>\n"
             "<|im_start|>user\nAnd 3 plus 3?<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<bos><start_of_turn>user\nWhat is 2 plus 2?<end_of_turn>\n"
              "<start_of_turn>model\n2 plus 2 is 4.<end_of_turn>\n"
              "<start_of_turn>user\nAnd 3 plus 3?<end_of_turn>\n<start_of_turn>model\n",
    "mllama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 2 is 4.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 plus 3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma3", "mllama"])
def test_chat_template_renders(name, zoo_cache):
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir(name, zoo_cache))
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED[name]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == rendered


@pytest.mark.parametrize(("name", "end_of_turn"), [("llama", "<|eot_id|>"), ("mllama", "<|eot_id|>"),
                                                 ("gemma3", "<end_of_turn>")])
def test_generation_config_stops_on_end_of_turn(name, end_of_turn, zoo_cache):
    config = transformers.GenerationConfig.from_pretrained(zoo_model_dir(name, zoo_cache))
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir(name, zoo_cache))
    assert config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]


@pytest.mark.parametrize("name", QWEN_VLMS)
def test_vlm_loads_with_auto_class_and_trains_on_cpu(name, zoo_cache):
    directory = zoo_model_dir(name, zoo_cache)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    inputs = make_vlm_inputs(tokenizer, model.config, grid_thw=(1, 4, 6))
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 6  # 24 patches / 2x2 merge
    rendered = tokenizer.decode(inputs["input_ids"][0])
    assert rendered.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision_grad = model.model.visual.patch_embed.proj.weight.grad
    assert vision_grad is not None and vision_grad.abs().sum() > 0  # the image reached the loss
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_vlm_inputs_refuse_grids_that_cannot_be_merged(zoo_cache):
    model, tokenizer = load_zoo_model("qwen2_vl", cache_dir=zoo_cache)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        make_vlm_inputs(tokenizer, model.config, grid_thw=(1, 3, 4))


# --- the 4-bit (bitsandbytes NF4, double quant) variant ----------------------------------------

def _dequantized_copy(model4, name, zoo_cache):
    """The full-precision model with every linear weight replaced by its NF4 round trip."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    reference, _ = load_zoo_model(name, cache_dir=zoo_cache)
    modules = dict(reference.named_modules())
    for module_name, module in model4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[module_name].weight.data.copy_(weight.reshape(modules[module_name].weight.shape))
    return reference


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_4bit_variant_is_nf4_of_the_same_weights(name, zoo_cache):
    import bitsandbytes as bnb

    model4, tokenizer = load_zoo_model(name, load_in_4bit=True, cache_dir=zoo_cache)
    quantized = [n for n, m in model4.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    n_layers = model4.config.num_hidden_layers
    assert len(quantized) == 7 * n_layers  # q k v o gate up down in every layer
    assert not isinstance(model4.lm_head, bnb.nn.Linear4bit)
    state = model4.model.layers[0].mlp.down_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantisation
    reference = _dequantized_copy(model4, name, zoo_cache)

    batch = tokenizer(["Describe a red kite.", "What is 3 plus 9?"], return_tensors="pt", padding=True)
    model4.train()  # stay in training mode: see load_zoo_model's note on CPU eval repacking
    embeds = model4.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits4 = model4(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        expected = reference(**batch).logits
    # fp32 compute on identical (dequantised) weights: only summation order differs.
    torch.testing.assert_close(logits4, expected, rtol=1e-4, atol=1e-4)
    logits4.float().logsumexp(-1).mean().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0


_TEXT_4BIT = {f"model.language_model.layers.N.{m}" for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
# Per VLM, with layer indices folded to N: the Linear4bit modules, and the nn.Linear modules left in
# full precision. Qwen's ViT blocks and mllama's vision model are quantised (as Unsloth does);
# the projectors, lm_head and Gemma 3's whole SigLIP tower are not.
EXPECTED_4BIT = {
    "qwen2_vl": (_TEXT_4BIT | {f"model.visual.blocks.N.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
                 {"lm_head", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}),
    "qwen2_5_vl": (_TEXT_4BIT | {f"model.visual.blocks.N.{m}" for m in
                                ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
                   {"lm_head", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}),
    "qwen3_vl": (_TEXT_4BIT | {f"model.visual.blocks.N.{m}" for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1",
                                                                        "mlp.linear_fc2")},
                 {"lm_head", "model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2",
                  "model.visual.deepstack_merger_list.N.linear_fc1",
                  "model.visual.deepstack_merger_list.N.linear_fc2"}),
    "gemma3": (_TEXT_4BIT,
               {"lm_head"} | {f"model.vision_tower.encoder.layers.N.{m}" for m in
                              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                               "mlp.fc1", "mlp.fc2")}),
    "mllama": (_TEXT_4BIT | {f"model.language_model.layers.N.cross_attn.{m}" for m in ("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj")}
               | {f"model.vision_model.{part}.layers.N.{m}" for part in ("transformer", "global_transformer")
                  for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.fc1", "mlp.fc2")},
               {"lm_head", "model.multi_modal_projector"}),
}


def _fold(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


@pytest.mark.parametrize("name", VLM_MODELS)
def test_4bit_vlm_quantises_what_unsloth_quantises(name, zoo_cache):
    import bitsandbytes as bnb

    model4, _ = load_zoo_model(name, load_in_4bit=True, cache_dir=zoo_cache)
    quantized = [n for n, m in model4.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    full = [n for n, m in model4.named_modules()
            if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)]
    expected_quantized, expected_full = EXPECTED_4BIT[name]
    assert _fold(quantized) == expected_quantized
    assert _fold(full) == expected_full
    if name == "mllama":  # self-attention layers 0 and 2, the cross-attention layer 1
        assert {n.split(".")[3] for n in quantized if ".cross_attn." in n} == {"1"}
        assert {n.split(".")[3] for n in quantized if ".self_attn." in n and "language_model" in n} == {"0", "2"}
    model4.train()  # stay in training mode: see load_zoo_model's note on CPU eval repacking
    out = model4(**vlm_chat_batch(name, 2, labels=True, cache_dir=zoo_cache))
    assert torch.isfinite(out.loss)


# --- vision-language models with their real processors -----------------------------------------

MESSAGES = chat_messages("Describe.", "A cat.")
RENDERED_VLM = {
    **{name: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
             "<|im_start|>assistant\nA cat.<|im_end|>\n" for name in QWEN_VLMS},
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>Describe.<end_of_turn>\n"
              "<start_of_turn>model\nA cat.<end_of_turn>\n",
    "mllama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>",
}


def _processor(name, zoo_cache):
    return transformers.AutoProcessor.from_pretrained(zoo_model_dir(name, zoo_cache))


@pytest.mark.parametrize("name", VLM_MODELS)
def test_vlm_processor_round_trips_through_auto_processor(name, zoo_cache, tmp_path):
    processor = _processor(name, zoo_cache)
    processor_class, image_class, video_class = EXPECTED_PROCESSORS[name]
    assert type(processor).__name__ == processor_class
    assert type(processor.image_processor).__name__ == image_class
    assert type(getattr(processor, "video_processor", None)).__name__ == (video_class or "NoneType")
    for template_owner in (processor, processor.tokenizer):
        rendered = template_owner.apply_chat_template(MESSAGES, tokenize=False)
        assert rendered == RENDERED_VLM[name]
    processor.save_pretrained(tmp_path)
    reloaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(processor)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.chat_template == processor.chat_template == processor.tokenizer.chat_template
    first, again = vlm_chat_batch(processor, 2), vlm_chat_batch(reloaded, 2)
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key


def _count(batch, token_id) -> list[int]:
    return (batch["input_ids"] == token_id).sum(-1).tolist()


@pytest.mark.parametrize("name", QWEN_VLMS)
def test_qwen_processor_grids_and_image_tokens(name, zoo_cache):
    processor = _processor(name, zoo_cache)
    config = transformers.AutoConfig.from_pretrained(zoo_model_dir(name, zoo_cache))
    patch = config.vision_config.patch_size
    # A 56x56 image is one 4x4 grid of patches (Qwen3-VL resizes it to 64x64 for its 16-pixel
    # patches), merged 2x2 into 4 tokens; 112x84 (w x h) is 8x6 patches, 12 tokens.
    batch = vlm_chat_batch(processor, 2, image_sizes=[(56, 56), (112, 84)])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
    assert batch["pixel_values"].shape == (16 + 48, 3 * 2 * patch * patch)
    assert _count(batch, config.image_token_id) == [4, 12]
    assert _count(batch, config.vision_start_token_id) == _count(batch, config.vision_end_token_id) == [1, 1]
    # The modality of each token, which M-RoPE needs: 1 exactly on the image pads.
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == config.image_token_id).long())


def test_gemma3_processor_expands_the_image_into_soft_tokens(zoo_cache):
    processor = _processor("gemma3", zoo_cache)
    config = transformers.AutoConfig.from_pretrained(zoo_model_dir("gemma3", zoo_cache))
    tokenizer = processor.tokenizer
    assert (tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == (
        "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    assert (config.boi_token_index, config.eoi_token_index, config.image_token_index) == (
        tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id)
    batch = vlm_chat_batch(processor, 2, image_sizes=[(56, 56), (120, 40)])  # any size is resized to 56x56
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert _count(batch, config.image_token_index) == [config.mm_tokens_per_image] * 2 == [4, 4]
    assert _count(batch, config.boi_token_index) == _count(batch, config.eoi_token_index) == [1, 1]
    assert _count(batch, tokenizer.bos_token_id) == [1, 1]  # the template's BOS, not a second one
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == config.image_token_index).long())
    text = tokenizer.decode(batch["input_ids"][0])
    assert "user\n\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\nDescribe." in text


def test_mllama_processor_tiles_and_cross_attention_mask(zoo_cache):
    processor = _processor("mllama", zoo_cache)
    config = transformers.AutoConfig.from_pretrained(zoo_model_dir("mllama", zoo_cache))
    vision = config.vision_config
    # 28x28 is one tile; 56x28 (w x h) two tiles side by side (aspect ratio id 2 of 1..3).
    batch = vlm_chat_batch(processor, 2, image_sizes=[(28, 28), (56, 28)])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                          "cross_attention_mask"}
    assert batch["pixel_values"].shape == (2, 1, vision.max_num_tiles, 3, vision.image_size, vision.image_size)
    assert batch["aspect_ratio_ids"].tolist() == [[1], [2]]
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 0]], [[1, 1]]]
    assert _count(batch, config.image_token_index) == [1, 1]
    mask = batch["cross_attention_mask"]
    assert mask.shape == (*batch["input_ids"].shape, 1, vision.max_num_tiles)
    for row in range(2):  # text from the <|image|> token on attends to the image's tiles
        start = (batch["input_ids"][row] == config.image_token_index).nonzero().item()
        n_tiles = batch["aspect_ratio_mask"][row, 0].sum().item()
        assert mask[row, :start].sum() == 0
        assert (mask[row, start:, 0, :n_tiles] == 1).all() and (mask[row, :, 0, n_tiles:] == 0).all()


@pytest.mark.parametrize("name", VLM_MODELS)
def test_vlm_trains_and_generates_from_a_processor_batch(name, zoo_cache):
    directory = zoo_model_dir(name, zoo_cache)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(directory)
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    model.train()
    # The second image is 112x84: 3x4 merged tokens, hence several Qwen2.5-VL attention windows;
    # two mllama tiles.
    sizes = [(56, 56), (112, 84)]
    batch = vlm_chat_batch(processor, 2, image_sizes=sizes, labels=True)
    assert (batch["labels"] != -100).sum() > 0
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(model.config.get_text_config().vocab_size)) < 1.0  # random init
    out.loss.backward()
    for param_name, param in model.named_parameters():  # the images reach the loss through every part
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"
    with torch.no_grad():  # other images change the loss
        other = vlm_chat_batch(processor, 2, image_sizes=sizes, labels=True, seed=1)
        assert torch.equal(other["input_ids"], batch["input_ids"])
        assert model(**other).loss.item() != out.loss.item()

    model.eval()
    prompt = vlm_chat_batch(processor, 1, with_answer=False, add_generation_prompt=True)
    generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_make_images_is_deterministic():
    first = make_images(2, [(56, 56), (30, 20)], seed=3)
    assert [image.size for image in first] == [(56, 56), (30, 20)] and first[0].mode == "RGB"
    again = make_images(2, [(56, 56), (30, 20)], seed=3)
    assert [image.tobytes() for image in first] == [image.tobytes() for image in again]
    assert make_images(1, seed=4)[0].tobytes() != make_images(1, seed=3)[0].tobytes()
    with pytest.raises(ValueError, match="Got 1 sizes for 2 images"):
        make_images(2, [(56, 56)])


def test_building_does_not_disturb_the_callers_random_state(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    zoo_model_dir("qwen3", tmp_path)  # a fresh build seeds its own generator
    assert torch.equal(torch.rand(3), expected)
