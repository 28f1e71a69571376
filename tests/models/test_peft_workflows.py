"""PEFT's multi-adapter workflows on patched models, against plain HF + PEFT on the same adapters.

Every test builds a *fast* PEFT model (zoo Llama -> ``patch_model`` -> ``FastLanguageModel.
get_peft_model``) and a *plain* one (the same weights -> ``peft.get_peft_model``), gives both the
same non-zero adapters, drives a real PEFT workflow (save/load, ``load_adapter``/``set_adapter``,
``disable_adapter``, ``delete_adapter``, ``add_weighted_adapter``, merging, mixed-adapter batches,
hotswapping) on both, and compares fp32 eval-mode logits. Each test also checks that the adapter
in play really changes the logits (so no comparison can pass vacuously) and, where the model state
decides it, what ``lora_fusion_report`` says about the fused LoRA path.

Models run through the torch backend: the kernels themselves are tested in tests/kernels.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from unsloth_like import FastLanguageModel
from unsloth_like.kernels import use_backend
from unsloth_like.models import is_patched, patch_model
from unsloth_like.models.patching import lora_fusion_report
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please."]
RANK, ALPHA = 8, 16
ATOL = 1e-4  # fp32, patched vs plain
MIN_EFFECT = 1e-2  # an adapter must move the logits by more than this (they are ~1 in magnitude)
MERGED = "adapter merged into the base weights"
DISABLED = "adapters disabled"
HOOKED = "forward hooks on the layer (e.g. a mixed-adapter batch with adapter_names=)"


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine multi-threaded
    LAPACK (the svd combinations) and matmuls slow down ~50x waiting at their barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM")


def _perturb(model, adapter_name: str, seed: int, scale: float = 0.05) -> None:
    """Seeded random lora_A/lora_B of one adapter (PEFT initialises lora_B to zero)."""
    generator = torch.Generator().manual_seed(seed)
    params = sorted((n, p) for n, p in model.named_parameters()
                    if f".lora_A.{adapter_name}." in n or f".lora_B.{adapter_name}." in n)
    assert params, f"no adapter {adapter_name!r} in the model"
    with torch.no_grad():
        for _, param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _copy_adapter(source, target, adapter_name: str = "default") -> None:
    state = get_peft_model_state_dict(source, adapter_name=adapter_name)
    result = set_peft_model_state_dict(target, state, adapter_name=adapter_name)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k and f".{adapter_name}." in k]


def _setup(zoo_cache, seed: int = 0):
    """``(base, fast, plain, tokenizer)``: the plain HF model, and the patched and plain PEFT
    models around copies of it, both with the same non-zero ``default`` adapter."""
    base, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    fast = copy.deepcopy(base)
    patch_model(fast)
    fast = FastLanguageModel.get_peft_model(fast, r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                            random_state=3407 + seed)
    plain = peft.get_peft_model(copy.deepcopy(base), _lora_config())
    assert isinstance(fast, PeftModel) and is_patched(fast) and not is_patched(plain) and not is_patched(base)
    _perturb(fast, "default", seed)
    _copy_adapter(fast, plain)
    return base, fast, plain, tokenizer


def _save_adapter(base, directory, seed: int) -> None:
    """Save a plain PEFT adapter (rank ``RANK``, non-zero, seeded) for ``base`` to ``directory``."""
    model = peft.get_peft_model(copy.deepcopy(base), _lora_config())
    _perturb(model, "default", seed)
    model.save_pretrained(directory)


def _batch(tokenizer, texts=TEXTS) -> dict:
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _logits(model, batch, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), use_backend("torch"):
        return model(**batch, **kwargs).logits


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"


def _assert_differ(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a - b).abs().max().item()
    assert diff > MIN_EFFECT, f"the adapter barely changes the logits (max abs diff {diff:.3g})"


def _report_states(model) -> set[str]:
    report = lora_fusion_report(model)
    assert len(report) == 3 * 3  # 3 layers x (qkv, o_proj, mlp)
    return set(report.values())


def _assert_fused(model) -> None:
    assert _report_states(model) == {"fused"}


# --- 1. save_pretrained / from_pretrained ---------------------------------------------------------


def test_fast_adapter_saves_a_standard_dir_that_plain_peft_loads(zoo_cache, tmp_path):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    _assert_fused(fast)
    logits_fast = _logits(fast, batch)
    _assert_differ(logits_fast, _logits(base, batch))

    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    fast_weights = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    plain_weights = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert sorted(fast_weights) == sorted(plain_weights)  # the same keys as a plain PEFT save
    assert all(torch.equal(fast_weights[k], plain_weights[k]) for k in fast_weights)
    config = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast")
    assert not is_patched(loaded)
    _assert_same(_logits(loaded, batch), logits_fast)
    _assert_same(_logits(plain, batch), logits_fast)


def _check_plain_adapter_loads(zoo_cache, adapter_dir, loader, save_tokenizer):
    base, _, plain, tokenizer = _setup(zoo_cache, seed=1)
    batch = _batch(tokenizer)
    plain.save_pretrained(adapter_dir)  # a standard PEFT adapter dir: config + weights, no tokenizer
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(zoo_model_dir("llama", zoo_cache))
    if loader == "PeftModel.from_pretrained":
        patched = copy.deepcopy(base)
        patch_model(patched)
        model = PeftModel.from_pretrained(patched, adapter_dir)
    else:
        if save_tokenizer:
            tokenizer.save_pretrained(adapter_dir)  # as Unsloth notebooks save adapters
        model, loaded_tokenizer = FastLanguageModel.from_pretrained(str(adapter_dir), load_in_4bit=False)
        assert isinstance(model, PeftModel)
        assert loaded_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert is_patched(model)
    _assert_fused(model)
    logits_plain = _logits(plain, batch)
    _assert_differ(logits_plain, _logits(base, batch))
    _assert_same(_logits(model, batch), logits_plain)


@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "FastLanguageModel.from_pretrained"])
def test_plain_adapter_loads_into_a_patched_model(zoo_cache, tmp_path, loader):
    _check_plain_adapter_loads(zoo_cache, tmp_path / "adapter", loader, save_tokenizer=True)


# --- 2. load_adapter + set_adapter ----------------------------------------------------------------


def test_load_adapter_and_set_adapter_switch_both_ways(zoo_cache, tmp_path):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    _save_adapter(base, tmp_path / "second", seed=2)
    logits_default = _logits(fast, batch)
    _assert_same(logits_default, _logits(plain, batch))

    for model in (fast, plain):
        model.load_adapter(tmp_path / "second", adapter_name="second")
        assert model.active_adapter == "default"  # loading does not switch
    _assert_fused(fast)
    _assert_same(_logits(fast, batch), logits_default)

    for model in (fast, plain):
        model.set_adapter("second")
    _assert_fused(fast)
    logits_second = _logits(fast, batch)
    _assert_same(logits_second, _logits(plain, batch))
    _assert_differ(logits_second, logits_default)
    _assert_differ(logits_second, _logits(base, batch))

    for model in (fast, plain):  # both at once (the tuner's set_adapter takes a list)
        model.base_model.set_adapter(["default", "second"])
    assert _report_states(fast) == {"2 active adapters"}
    logits_both = _logits(fast, batch)
    _assert_same(logits_both, _logits(plain, batch))
    _assert_differ(logits_both, logits_default)
    _assert_differ(logits_both, logits_second)

    for model in (fast, plain):
        model.set_adapter("default")
    _assert_fused(fast)
    _assert_same(_logits(fast, batch), logits_default)
    _assert_same(_logits(plain, batch), logits_default)


# --- 3. disable_adapter ---------------------------------------------------------------------------


def test_disable_adapter_gives_the_base_model(zoo_cache):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    logits_base = _logits(base, batch)
    logits_adapted = _logits(fast, batch)
    _assert_differ(logits_adapted, logits_base)

    with fast.disable_adapter():
        assert _report_states(fast) == {DISABLED}
        logits_disabled = _logits(fast, batch)
    with plain.disable_adapter():
        logits_plain_disabled = _logits(plain, batch)
    _assert_same(logits_disabled, logits_base)
    _assert_same(logits_disabled, logits_plain_disabled)

    _assert_fused(fast)  # enabled again on exit
    _assert_same(_logits(fast, batch), logits_adapted)
    _assert_same(_logits(plain, batch), logits_adapted)


# --- 4. delete_adapter ----------------------------------------------------------------------------


@pytest.mark.parametrize("deleted", ["second", "default"])
def test_delete_adapter(zoo_cache, tmp_path, deleted):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    _save_adapter(base, tmp_path / "second", seed=2)
    logits_default = _logits(fast, batch)
    for model in (fast, plain):
        model.load_adapter(tmp_path / "second", adapter_name="second")
        model.set_adapter("second")
    logits_second = _logits(fast, batch)
    _assert_same(logits_second, _logits(plain, batch))
    _assert_differ(logits_second, logits_default)

    for model in (fast, plain):
        model.delete_adapter(deleted)  # deleting the active one ("second") activates the other
    remaining = "default" if deleted == "second" else "second"
    for model in (fast, plain):
        assert list(model.peft_config) == [remaining]
        assert model.active_adapter == remaining
        assert not any(f".{deleted}." in n for n, _ in model.named_parameters())
    _assert_fused(fast)
    logits_remaining = _logits(fast, batch)
    _assert_same(logits_remaining, logits_default if remaining == "default" else logits_second)
    _assert_same(logits_remaining, _logits(plain, batch))
    _assert_differ(logits_remaining, _logits(base, batch))


# --- 5. add_weighted_adapter ----------------------------------------------------------------------

COMBINATIONS = ["linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.parametrize("combination_type", COMBINATIONS)
def test_add_weighted_adapter(zoo_cache, tmp_path, combination_type):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    _save_adapter(base, tmp_path / "second", seed=2)
    for model in (fast, plain):
        model.load_adapter(tmp_path / "second", adapter_name="second")
    kwargs = {"density": 0.5} if combination_type not in ("linear", "svd", "cat") else {}
    for model in (fast, plain):
        torch.manual_seed(0)  # dare_* drop at random: the same draws for both models
        model.add_weighted_adapter(["default", "second"], [0.7, 0.5], "combined",
                                   combination_type=combination_type, **kwargs)
        model.set_adapter("combined")
    combined_fast = get_peft_model_state_dict(fast, adapter_name="combined")
    combined_plain = get_peft_model_state_dict(plain, adapter_name="combined")
    assert sorted(combined_fast) == sorted(combined_plain)
    assert all(torch.equal(combined_fast[k], combined_plain[k]) for k in combined_fast)
    if combination_type == "cat":
        assert fast.peft_config["combined"].r == 2 * RANK

    _assert_fused(fast)
    logits_combined = _logits(fast, batch)
    _assert_same(logits_combined, _logits(plain, batch))
    _assert_differ(logits_combined, _logits(base, batch))


# --- 6. merging -----------------------------------------------------------------------------------


def test_merge_and_unmerge_adapter(zoo_cache):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    logits_adapted = _logits(fast, batch)
    _assert_differ(logits_adapted, _logits(base, batch))

    fast.merge_adapter()
    plain.merge_adapter()
    assert _report_states(fast) == {MERGED}
    logits_merged = _logits(fast, batch)
    _assert_same(logits_merged, logits_adapted)
    _assert_same(logits_merged, _logits(plain, batch))

    fast.unmerge_adapter()
    plain.unmerge_adapter()
    _assert_fused(fast)
    _assert_same(_logits(fast, batch), logits_adapted)
    _assert_same(_logits(plain, batch), logits_adapted)


def test_merge_and_unload_returns_the_merged_base_model(zoo_cache):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    logits_adapted = _logits(fast, batch)
    _assert_differ(logits_adapted, _logits(base, batch))

    merged_fast = fast.merge_and_unload()
    merged_plain = plain.merge_and_unload()
    assert type(merged_fast) is type(base) and not isinstance(merged_fast, PeftModel)
    assert not any(".lora_" in n for n, _ in merged_fast.named_parameters())
    assert is_patched(merged_fast)  # our forwards stay bound on the unwrapped model
    assert _report_states(merged_fast) == {"no adapter in the group"}
    logits_merged = _logits(merged_fast, batch)
    _assert_same(logits_merged, logits_adapted)
    _assert_same(logits_merged, _logits(merged_plain, batch))


# --- 7. mixed-adapter batches ---------------------------------------------------------------------


def test_mixed_adapter_batch(zoo_cache, tmp_path):
    base, fast, plain, tokenizer = _setup(zoo_cache)
    texts = [*TEXTS, "A third, longer line of text for the base row."]
    batch = _batch(tokenizer, texts)
    _save_adapter(base, tmp_path / "second", seed=2)
    for model in (fast, plain):
        model.load_adapter(tmp_path / "second", adapter_name="second")
    names = ["default", "second", "__base__"]

    seen = []
    layer = fast.get_base_model().model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(_report_states(fast)))
    try:
        logits_mixed = _logits(fast, batch, adapter_names=names)
    finally:
        handle.remove()
    assert seen == [{HOOKED}]  # PEFT's adapter_names hooks are on the layers during the call
    _assert_fused(fast)  # and gone afterwards
    _assert_same(logits_mixed, _logits(plain, batch, adapter_names=names))

    per_adapter = {"default": _logits(fast, batch)}
    for model in (fast, plain):
        model.set_adapter("second")
    per_adapter["second"] = _logits(fast, batch)
    with fast.disable_adapter():
        per_adapter["__base__"] = _logits(fast, batch)
    _assert_same(per_adapter["__base__"], _logits(base, batch))
    _assert_differ(per_adapter["default"], per_adapter["__base__"])
    _assert_differ(per_adapter["second"], per_adapter["__base__"])
    _assert_differ(per_adapter["second"], per_adapter["default"])
    for row, name in enumerate(names):
        _assert_same(logits_mixed[row], per_adapter[name][row])

    # generate with adapter_names (KV cache, PEFT's hooks on every step): greedy tokens agree
    for model in (fast, plain):
        model.set_adapter("default")
    tokenizer.padding_side = "left"
    prompts = _batch(tokenizer, texts)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "adapter_names": names}
    with torch.no_grad(), use_backend("torch"):
        generated_fast = fast.generate(**prompts, **kwargs)
        generated_plain = plain.generate(**prompts, **kwargs)
    assert torch.equal(generated_fast, generated_plain)


# --- 8. hotswap -----------------------------------------------------------------------------------


def test_hotswap_adapter_replaces_the_default_adapter(zoo_cache, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    base, fast, plain, tokenizer = _setup(zoo_cache)
    batch = _batch(tokenizer)
    _save_adapter(base, tmp_path / "other", seed=3)
    logits_before = _logits(fast, batch)
    _assert_same(logits_before, _logits(plain, batch))

    for model in (fast, plain):
        hotswap_adapter(model, str(tmp_path / "other"), adapter_name="default")
        assert list(model.peft_config) == ["default"]
    _assert_fused(fast)
    logits_after = _logits(fast, batch)
    _assert_same(logits_after, _logits(plain, batch))
    _assert_differ(logits_after, logits_before)
    _assert_differ(logits_after, _logits(base, batch))

    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other")
    _assert_same(logits_after, _logits(reference, batch))


# --- 1b. a plain PEFT adapter dir (no tokenizer files) through FastLanguageModel -------------------


def test_fast_language_model_loads_a_plain_peft_adapter_dir_without_tokenizer(zoo_cache, tmp_path):
    """``PeftModel.save_pretrained`` writes no tokenizer: the base model's must be used then."""
    _check_plain_adapter_loads(zoo_cache, tmp_path / "adapter", "FastLanguageModel.from_pretrained",
                               save_tokenizer=False)
