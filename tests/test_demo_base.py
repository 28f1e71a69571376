"""The demo base (``unsloth_like.demo_base``): built once, cached atomically, and it knows what the
demo's held-back questions ask about."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from unsloth_like.demo_base import RECIPE, demo_base_dir
from unsloth_like.demo_data import ANIMALS

TINY = dataclasses.replace(RECIPE, steps=3, batch_size=4, warmup_steps=1)


def test_the_demo_base_is_built_once_and_reused(tmp_path):
    said = []
    path = demo_base_dir(tmp_path, recipe=TINY, log=said.append)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    record = json.loads((path / "pretraining.json").read_text())
    assert record["recipe"] == dataclasses.asdict(TINY) and len(record["losses"]) == 3
    assert len(said) == 2 and "pretraining the demo base once" in said[0] and "pretrained the demo base" in said[1]
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == [path.name]  # no staging folder left

    again = []
    assert demo_base_dir(tmp_path, recipe=TINY, log=again.append) == path and not again
    other = demo_base_dir(tmp_path, recipe=dataclasses.replace(TINY, steps=2), log=again.append)
    assert other != path and len(json.loads((other / "pretraining.json").read_text())["losses"]) == 2


def test_pretraining_changes_the_weights_and_stays_finite(tmp_path):
    from safetensors.torch import load_file

    from unsloth_like.demo_base import DEMO_BASE_SPEC
    from unsloth_like.testing.zoo import zoo_model_dir

    seeded = load_file(zoo_model_dir(DEMO_BASE_SPEC, tmp_path / "zoo") / "model.safetensors")
    trained = load_file(demo_base_dir(tmp_path / "base", recipe=TINY, log=lambda _: None) / "model.safetensors")
    assert seeded.keys() == trained.keys()
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert not torch.equal(seeded["model.layers.0.mlp.down_proj.weight"], trained["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.slow
def test_the_pretrained_demo_base_knows_the_facts(zoo_cache):
    """The real recipe (shared with the demo's test through the zoo cache): in plain text, the base
    completes where each animal lives and what it eats. Greedy completions of a seeded build; the
    thresholds (of 24) leave room for another CPU's rounding. (Its copying from context is
    partial in plain text, about half of the colour/thing pairs; the demo's test checks the
    descriptions after the finetune.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_base_dir(zoo_cache, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def completes(prompt: str, expected: str) -> bool:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().startswith(expected)

    homes = sum(completes(f"The {animal} lives in the", home) for animal, (home, _) in ANIMALS.items())
    foods = sum(completes(f"The {animal} eats", food) for animal, (_, food) in ANIMALS.items())
    assert homes >= 22 and foods >= 22, (homes, foods)
