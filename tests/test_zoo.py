"""The tiny-model zoo: real HF classes with awkward sizes, seeded, cached, with real tokenizers."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

from unsloth_like.testing.zoo import ZOO, get_spec, load_zoo_model, make_vlm_inputs, zoo_model_dir

TEXT_MODELS = [name for name, spec in ZOO.items() if not spec.is_vlm]
EXPECTED_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
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
}


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_chat_template_renders(name, zoo_cache):
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir(name, zoo_cache))
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED[name]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == rendered


def test_generation_config_stops_on_end_of_turn(zoo_cache):
    config = transformers.GenerationConfig.from_pretrained(zoo_model_dir("llama", zoo_cache))
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache))
    assert config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def test_vlm_loads_with_auto_class_and_trains_on_cpu(zoo_cache):
    directory = zoo_model_dir("qwen2_vl", zoo_cache)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == EXPECTED_CLASSES["qwen2_vl"]
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


def test_4bit_vlm_keeps_the_vision_tower_in_full_precision(zoo_cache):
    import bitsandbytes as bnb

    model4, tokenizer = load_zoo_model("qwen2_vl", load_in_4bit=True, cache_dir=zoo_cache)
    visual = [n for n, m in model4.model.visual.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    language = [n for n, m in model4.model.language_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert visual == [] and len(language) == 7 * model4.config.text_config.num_hidden_layers
    inputs = make_vlm_inputs(tokenizer, model4.config)
    out = model4(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)


def test_building_does_not_disturb_the_callers_random_state(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    zoo_model_dir("qwen3", tmp_path)  # a fresh build seeds its own generator
    assert torch.equal(torch.rand(3), expected)
