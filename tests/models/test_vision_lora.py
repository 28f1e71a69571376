"""Which modules the ``finetune_*`` flags adapt, and which stay 16-bit in a quantised load.

The expected sets are Unsloth's selections as computed on transformers 5.24's module layout
(../shared/notes/vision-facts.md §1.4 and §1.6), written out per family: merger, projector and
lm_head are never adapted, mllama's cross-attention counts as language attention. Models are
built on the meta device (no weights), so every family is cheap to check.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from unsloth_like.models.vision import is_vision_config, keep_unquantized_modules
from unsloth_like.models.vision_lora import decoder_layers_only, exact_regex, lora_target, select_lora_modules

_TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=300)
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
CONFIGS = {
    "qwen2_vl": ("Qwen2VLConfig", dict(text_config=dict(_TEXT, rope_parameters=_MROPE),
                                       vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64))),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", dict(text_config=dict(_TEXT, rope_parameters=_MROPE),
                                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48,
                                                               num_heads=2, out_hidden_size=64,
                                                               fullatt_block_indexes=[1]))),
    "qwen3_vl": ("Qwen3VLConfig", dict(text_config=dict(_TEXT, head_dim=16, rope_parameters=dict(
        _MROPE, mrope_interleaved=True)), vision_config=dict(depth=2, hidden_size=32, intermediate_size=48,
                                                             num_heads=2, out_hidden_size=64,
                                                             deepstack_visual_indexes=[0]))),
    "gemma3": ("Gemma3Config", dict(text_config=dict(_TEXT, head_dim=16),
                                    vision_config=dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                                       num_hidden_layers=2, image_size=28, patch_size=14,
                                                       vision_use_head=False), mm_tokens_per_image=1)),
    "mllama": ("MllamaConfig", dict(text_config=dict(_TEXT, num_hidden_layers=3, cross_attention_layers=[1],
                                                     pad_token_id=0),
                                    vision_config=dict(hidden_size=32, intermediate_size=48, attention_heads=2,
                                                       num_hidden_layers=2, num_global_layers=2, image_size=28,
                                                       patch_size=14, vision_output_dim=64,
                                                       intermediate_layers_indices=[0]))),
}

LANGUAGE_ATTENTION = {f"model.language_model.layers.N.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
LANGUAGE_MLP = {f"model.language_model.layers.N.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
QWEN_VISION_ATTENTION = {"model.visual.blocks.N.attn.qkv", "model.visual.blocks.N.attn.proj"}
EXPECTED = {  # family -> (vision attention, vision MLP, language attention, language MLP)
    "qwen2_vl": (QWEN_VISION_ATTENTION, {"model.visual.blocks.N.mlp.fc1", "model.visual.blocks.N.mlp.fc2"},
                 LANGUAGE_ATTENTION, LANGUAGE_MLP),
    "qwen2_5_vl": (QWEN_VISION_ATTENTION, {f"model.visual.blocks.N.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
                   LANGUAGE_ATTENTION, LANGUAGE_MLP),
    "qwen3_vl": (QWEN_VISION_ATTENTION, {"model.visual.blocks.N.mlp.linear_fc1", "model.visual.blocks.N.mlp.linear_fc2"},
                 LANGUAGE_ATTENTION, LANGUAGE_MLP),
    "gemma3": ({f"model.vision_tower.encoder.layers.N.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
               {"model.vision_tower.encoder.layers.N.mlp.fc1", "model.vision_tower.encoder.layers.N.mlp.fc2"},
               LANGUAGE_ATTENTION, LANGUAGE_MLP),
    "mllama": ({f"model.vision_model.{t}.layers.N.self_attn.{p}" for t in ("transformer", "global_transformer")
                for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
               {f"model.vision_model.{t}.layers.N.mlp.{p}" for t in ("transformer", "global_transformer")
                for p in ("fc1", "fc2")},
               LANGUAGE_ATTENTION | {f"model.language_model.layers.N.cross_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
               LANGUAGE_MLP),
}
KEEP_UNQUANTIZED = {
    "qwen2_vl": ["lm_head", "model.visual.merger"],
    "qwen2_5_vl": ["lm_head", "model.visual.merger"],
    "qwen3_vl": ["lm_head", "model.visual.deepstack_merger_list", "model.visual.merger"],
    "gemma3": ["lm_head", "model.multi_modal_projector", "model.vision_tower"],  # its projector has no Linear
    "mllama": ["lm_head", "model.multi_modal_projector"],
}
FLAGS = {  # name -> (vision, language, attention, mlp)
    "all": (True, True, True, True),
    "no_vision": (False, True, True, True),
    "no_language": (True, False, True, True),
    "no_attention": (True, True, False, True),
    "no_mlp": (True, True, True, False),
}


def _config(family):
    class_name, kwargs = CONFIGS[family]
    return getattr(transformers, class_name)(**kwargs)


def _meta_model(family):
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(_config(family))


def _folded(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("family", CONFIGS)
def test_each_flag_combination_selects_unsloths_modules(family, flags):
    vision, language, attention, mlp = FLAGS[flags]
    vision_attention, vision_mlp, language_attention, language_mlp = EXPECTED[family]
    expected = set()
    if vision and attention:
        expected |= vision_attention
    if vision and mlp:
        expected |= vision_mlp
    if language and attention:
        expected |= language_attention
    if language and mlp:
        expected |= language_mlp
    model = _meta_model(family)
    selected = select_lora_modules(model, vision=vision, language=language, attention=attention, mlp=mlp)
    assert _folded(selected) == expected


@pytest.mark.parametrize("family", CONFIGS)
def test_peft_target_regex_matches_exactly_the_selection(family):
    model = _meta_model(family)
    selected = select_lora_modules(model, vision=True, language=True, attention=True, mlp=True)
    regex = lora_target(model, vision=True, language=True, attention=True, mlp=True)
    assert regex == lora_target(model, vision=True, language=True, attention=True, mlp=True, target_modules="all-linear")
    every_module = [name for name, _ in model.named_modules() if name]
    assert sorted(n for n in every_module if re.fullmatch(regex, n)) == sorted(selected)


def test_exact_regex_falls_back_when_folding_would_overmatch():
    names = ["a.layers.0.q", "a.layers.1.q"]
    assert exact_regex(names, names) == r"a\.layers\.\d+\.(?:q)"  # folded: nothing else to match
    regex = exact_regex(names, [*names, "a.layers.2.q"])
    assert [n for n in [*names, "a.layers.2.q"] if re.fullmatch(regex, n)] == names
    model = _meta_model("qwen2_vl")
    only_first = lora_target(model, vision=False, language=True, attention=True, mlp=False,
                             target_modules=["q_proj"])
    assert re.fullmatch(only_first, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(only_first, "model.language_model.layers.0.self_attn.k_proj")


def test_explicit_list_with_every_flag_on_goes_to_peft_unchanged():
    model = _meta_model("gemma3")
    assert lora_target(model, vision=True, language=True, attention=True, mlp=True,
                       target_modules=["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_explicit_list_with_a_flag_off_is_intersected_with_the_flags():
    model = _meta_model("gemma3")  # q_proj exists in the SigLIP tower and the decoder
    regex = lora_target(model, vision=False, language=True, attention=True, mlp=True, target_modules=["q_proj"])
    matched = [n for n, _ in model.named_modules() if n and re.fullmatch(regex, n)]
    assert _folded(matched) == {"model.language_model.layers.N.self_attn.q_proj"}


@pytest.mark.parametrize("flags, message", [
    ((False, False, True, True), "finetune_vision_layers and finetune_language_layers are both False"),
    ((True, True, False, False), "finetune_attention_modules and finetune_mlp_modules are both False"),
])
def test_empty_flag_selections_are_errors(flags, message):
    vision, language, attention, mlp = flags
    with pytest.raises(ValueError, match=message):
        select_lora_modules(_meta_model("qwen2_vl"), vision=vision, language=language, attention=attention, mlp=mlp)


def test_flags_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="select no linear layer"):
        select_lora_modules(_meta_model("qwen2_vl"), vision=True, language=True, attention=True, mlp=True,
                            target_modules=["merger_does_not_exist"])


def test_finetune_last_n_layers_narrows_the_decoder_and_keeps_the_vision_tower():
    model = _meta_model("mllama")  # 3 decoder layers
    target = lora_target(model, vision=True, language=True, attention=True, mlp=True)
    narrowed = decoder_layers_only(model, target, last_n=1)
    matched = [n for n, _ in model.named_modules() if n and re.fullmatch(narrowed, n)]
    decoder = {n for n in matched if n.startswith("model.language_model.")}
    assert decoder and all(n.startswith("model.language_model.layers.2.") for n in decoder)
    assert any(n.startswith("model.vision_model.") for n in matched)
    assert decoder_layers_only(model, target, layers=[2]) == narrowed  # PEFT's layers_to_transform
    with pytest.raises(ValueError, match=r"finetune_last_n_layers must be an integer in 1\.\.3"):
        decoder_layers_only(model, target, last_n=4)
    with pytest.raises(ValueError, match=r"layers_to_transform must be decoder layer indices in 0\.\.2"):
        decoder_layers_only(model, target, layers=[3])
    with pytest.raises(ValueError, match="not both"):
        decoder_layers_only(model, target, last_n=1, layers=[2])


@pytest.mark.parametrize("family", CONFIGS)
def test_quantised_loads_keep_projectors_and_siglip_in_16_bit(family):
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = _config(family)
    assert is_vision_config(config)
    keep = keep_unquantized_modules(config)
    assert sorted(keep) == KEEP_UNQUANTIZED[family]
    # and transformers' own matcher honours the paths (the bare names Unsloth lists would not)
    model = _meta_model(family)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = {n for n in linear if not should_convert_module(n, keep)}
    assert kept == {n for n in linear if any(n == k or n.startswith(k + ".") for k in keep)}
    assert kept and any(n.startswith(("model.language_model.", "model.visual.blocks")) for n in set(linear) - kept)


def test_text_configs_are_not_vision_configs():
    assert not is_vision_config(transformers.LlamaConfig())
