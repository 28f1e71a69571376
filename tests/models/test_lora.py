"""get_peft_model: the fused LoRA path vs plain HF + PEFT, every fallback, checkpointing, bad input.

The fast model is a patched copy of the plain model with adapters from our ``get_peft_model``;
the reference is the plain (unpatched) model with adapters from ``peft.get_peft_model`` and the
same adapter weights. Models run on the torch backend (the kernels themselves are tested through
the Triton interpreter in tests/kernels).
"""

from __future__ import annotations

import copy
import logging

import peft
import pytest
import torch

from unsloth_like import FastLanguageModel
from unsloth_like.kernels import use_backend
from unsloth_like.models import patch_model
from unsloth_like.models.checkpointing import checkpointing_mode
from unsloth_like.models.lora import DEFAULT_TARGET_MODULES
from unsloth_like.models.patching import lora_fusion_report
from unsloth_like.testing.zoo import load_zoo_model

from ..kernels.tolerances import assert_close_normwise

TEXTS = ["What is 3 plus 4? It is 7.", "Describe a red kite, please."]


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _batch(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _perturb_adapters(model, seed=0):
    """PEFT starts B at zero; give every adapter weight seeded values so adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.05)


# What Llama's default target names mean on Phi-3's packed projections (plain PEFT needs them spelled out).
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _pair(name, zoo_cache, load_in_4bit=False, perturb=True, fast_kwargs=None, plain_kwargs=None, **lora):
    """(fast PEFT model, plain PEFT model, tokenizer) with identical adapters."""
    base, tokenizer = load_zoo_model(name, cache_dir=zoo_cache, load_in_4bit=load_in_4bit)
    if load_in_4bit:  # deepcopy of bitsandbytes 4-bit weights is not supported: load twice
        plain_base, _ = load_zoo_model(name, cache_dir=zoo_cache, load_in_4bit=True)
    else:
        plain_base = copy.deepcopy(base)
    patch_model(base)
    options = {"r": 8, "lora_alpha": 16, **lora}
    fast = FastLanguageModel.get_peft_model(base, use_gradient_checkpointing=False, **options, **(fast_kwargs or {}))
    targets = options.pop("target_modules", PHI3_TARGETS if name == "phi3" else DEFAULT_TARGET_MODULES)
    config = peft.LoraConfig(target_modules=list(targets), task_type="CAUSAL_LM", **options, **(plain_kwargs or {}))
    plain = peft.get_peft_model(plain_base, config)
    if perturb:
        _perturb_adapters(fast)
    adapters = peft.get_peft_model_state_dict(fast)
    assert adapters.keys() == peft.get_peft_model_state_dict(plain).keys()  # the same layers carry adapters
    peft.set_peft_model_state_dict(plain, adapters)
    return fast, plain, tokenizer


def _step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_step(fast, plain, batch, factor=50):
    loss_fast, grads_fast = _step(fast, batch)
    loss_plain, grads_plain = _step(plain, batch)
    assert abs(loss_fast.item() - loss_plain.item()) <= 1e-5 * max(1.0, loss_plain.item())
    assert grads_fast.keys() == grads_plain.keys() and grads_plain
    for name, grad in grads_plain.items():
        assert_close_normwise(grads_fast[name], grad, torch.float32, factor=factor)  # fp32: ~1e-4 relative


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_fused_lora_matches_plain_peft(name, zoo_cache):
    fast, plain, tokenizer = _pair(name, zoo_cache, use_rslora=(name == "qwen2"))
    assert isinstance(fast, peft.PeftModel)
    report = lora_fusion_report(fast)
    assert report and set(report.values()) == {"fused"}
    batch = _batch(tokenizer)
    _assert_same_training_step(fast, plain, batch)
    torch.testing.assert_close(_logits(fast, batch), _logits(plain, batch), rtol=0, atol=1e-4)


def test_phi3_takes_llama_target_names_on_its_packed_projections(zoo_cache, caplog):
    base, _ = load_zoo_model("phi3", cache_dir=zoo_cache)
    model = FastLanguageModel.get_peft_model(copy.deepcopy(base), use_gradient_checkpointing=False)
    assert set(model.peft_config["default"].target_modules) == set(PHI3_TARGETS)
    with caplog.at_level(logging.WARNING):
        partial = FastLanguageModel.get_peft_model(copy.deepcopy(base), target_modules=["q_proj", "v_proj", "up_proj"],
                                                   use_gradient_checkpointing=False)
    assert set(partial.peft_config["default"].target_modules) == {"qkv_proj", "gate_up_proj"}
    assert "covers k_proj too" in caplog.text and "covers gate_proj too" in caplog.text


@pytest.mark.parametrize("name", ["phi3", "llama"])
def test_fused_qlora_matches_plain_peft(name, zoo_cache):
    """NF4 bases (bitsandbytes on CPU): the fused path dequantises with our kernel. Training only:
    on CPU a no-grad forward makes bitsandbytes repack its weights (see zoo.load_zoo_model)."""
    fast, plain, tokenizer = _pair(name, zoo_cache, load_in_4bit=True)
    assert set(lora_fusion_report(fast).values()) == {"fused"}
    _assert_same_training_step(fast, plain, _batch(tokenizer))


def test_partial_targets_and_layers(zoo_cache):
    """Adapters on some projections / layers only: groups with none run the plain path."""
    fast, plain, tokenizer = _pair("qwen3", zoo_cache, target_modules=["q_proj", "v_proj", "down_proj"],
                                   layers_to_transform=[1])
    report = lora_fusion_report(fast)
    assert report["base_model.model.model.layers.1.self_attn.qkv"] == "fused"
    assert report["base_model.model.model.layers.1.mlp"] == "fused"
    assert report["base_model.model.model.layers.1.self_attn.o_proj"] == "no adapter in the group"
    assert report["base_model.model.model.layers.0.mlp"] == "no adapter in the group"
    _assert_same_training_step(fast, plain, _batch(tokenizer))


OPTIONS = [  # LoraConfig options beyond the usual ones: each works, fused or not, and equals plain PEFT
    pytest.param({"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 4}}, "fused", id="rank-alpha-pattern"),
    pytest.param({"use_rslora": True, "lora_alpha": 32}, "fused", id="rslora"),
    pytest.param({"exclude_modules": ["o_proj"]}, "fused", id="exclude-modules"),
    pytest.param({"init_lora_weights": "gaussian"}, "fused", id="init-gaussian"),
    pytest.param({"init_lora_weights": "pissa"}, "fused", id="init-pissa"),
    pytest.param({"init_lora_weights": "olora"}, "fused", id="init-olora"),
    pytest.param({"layer_replication": [[0, 2], [1, 3]]}, "fused", id="layer-replication"),
    pytest.param({"trainable_token_indices": [5, 17]}, "fused", id="trainable-tokens"),
]


@pytest.mark.parametrize("options, expected", OPTIONS)
def test_other_lora_options_work_and_match_plain_peft(options, expected, zoo_cache):
    fast, plain, tokenizer = _pair("llama", zoo_cache, **options)
    states = set(lora_fusion_report(fast).values()) - {"no adapter in the group"}
    assert states == {expected}
    if "layer_replication" in options:  # 4 decoder layers now, every one patched
        assert len(lora_fusion_report(fast)) == 3 * 4
    _assert_same_training_step(fast, plain, _batch(tokenizer))


FALLBACKS = [
    pytest.param({"lora_dropout": 0.1}, "lora_dropout > 0", id="dropout"),
    pytest.param({"use_dora": True}, "DoraLinearVariant", id="dora"),
    pytest.param({"lora_bias": True}, "lora_bias=True", id="lora_bias"),
    pytest.param({"bias": "all"}, "trainable base weight or bias", id="bias-all"),
]


@pytest.mark.parametrize("options, reason", FALLBACKS)
def test_fallbacks_run_peft_modules_and_say_why(options, reason, zoo_cache, caplog):
    with caplog.at_level(logging.INFO, logger="unsloth_like"):
        fast, plain, tokenizer = _pair("qwen2", zoo_cache, **options)
    report = lora_fusion_report(fast)
    if options == {"bias": "all"}:  # only qwen2's q/k/v have a bias to train; the rest still fuses
        assert all((reason in state) == name.endswith(".qkv") for name, state in report.items()), report
        assert {s for n, s in report.items() if not n.endswith(".qkv")} == {"fused"}
    else:
        assert report and all(reason in state for state in report.values()), report
    assert any(reason in r.getMessage() and "PEFT's modules run" in r.getMessage() for r in caplog.records)
    batch = _batch(tokenizer)
    if "lora_dropout" in options:  # same dropout masks in both models
        torch.manual_seed(0)
        loss_fast, grads_fast = _step(fast, batch)
        torch.manual_seed(0)
        loss_plain, grads_plain = _step(plain, batch)
        assert abs(loss_fast.item() - loss_plain.item()) <= 1e-5 * loss_plain.item()
        for name, grad in grads_plain.items():
            assert_close_normwise(grads_fast[name], grad, torch.float32, factor=50)
    else:
        _assert_same_training_step(fast, plain, batch)
    torch.testing.assert_close(_logits(fast, batch), _logits(plain, batch), rtol=0, atol=1e-4)


def test_runtime_fallbacks_switch_paths_and_log_once(zoo_cache, caplog):
    fast, plain, tokenizer = _pair("llama", zoo_cache)
    batch = _batch(tokenizer)
    with caplog.at_level(logging.INFO, logger="unsloth_like"):
        with fast.disable_adapter(), plain.disable_adapter():
            assert set(lora_fusion_report(fast).values()) == {"adapters disabled"}
            torch.testing.assert_close(_logits(fast, batch), _logits(plain, batch), rtol=0, atol=1e-4)
            _logits(fast, batch)
    messages = [r.getMessage() for r in caplog.records if "adapters disabled" in r.getMessage()]
    assert len(messages) == 1 and "layers.0" in messages[0]
    assert set(lora_fusion_report(fast).values()) == {"fused"}
    # several active adapters (PEFT's base-model API)
    fast.add_adapter("second", peft.LoraConfig(r=4, target_modules=list(DEFAULT_TARGET_MODULES)))
    plain.add_adapter("second", peft.LoraConfig(r=4, target_modules=list(DEFAULT_TARGET_MODULES)))
    _perturb_adapters(fast, seed=1)
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(fast, adapter_name="second"), "second")
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(fast, adapter_name="default"), "default")
    fast.base_model.set_adapter(["default", "second"])
    plain.base_model.set_adapter(["default", "second"])
    assert set(lora_fusion_report(fast).values()) == {"2 active adapters"}
    torch.testing.assert_close(_logits(fast, batch), _logits(plain, batch), rtol=0, atol=1e-4)


def test_8bit_base_falls_back(zoo_cache, caplog):
    import transformers

    from unsloth_like.testing.zoo import zoo_model_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(
        zoo_model_dir("llama", zoo_cache), quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    patch_model(model)
    with caplog.at_level(logging.INFO, logger="unsloth_like"):
        fast = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert all("Linear8bitLt" in state for state in lora_fusion_report(fast).values())
    assert any("Linear8bitLt" in r.getMessage() for r in caplog.records)


def test_modules_to_save_trains_embeddings_and_lm_head_through_fused_loss(zoo_cache):
    """New tokens + trainable embed_tokens/lm_head copies: the fused loss reads PEFT's copy of the
    lm_head, and the training step equals plain PEFT's."""
    fast, plain, tokenizer = _pair("llama", zoo_cache, modules_to_save=["embed_tokens", "lm_head"])
    batch = _batch(tokenizer)
    new_token = fast.get_base_model().config.vocab_size - 1  # beyond the tokenizer: an added token's row
    batch["input_ids"][:, 3] = new_token
    batch["labels"][:, 4] = new_token
    fast.train()
    assert fast(**batch).logits is None  # fused loss still taken with the wrapped lm_head
    loss_fast, grads_fast = _step(fast, batch)
    _, grads_plain = _step(plain, batch)
    head = [n for n in grads_fast if "lm_head.modules_to_save" in n]
    assert head and all(grads_fast[n].abs().sum() > 0 for n in head)
    embed = next(n for n in grads_fast if "embed_tokens.modules_to_save" in n)
    assert grads_fast[embed][new_token].abs().sum() > 0
    for name, grad in grads_plain.items():
        assert_close_normwise(grads_fast[name], grad, torch.float32, factor=50)


@pytest.mark.parametrize("mode", ["unsloth", True])
def test_checkpointing_modes_give_identical_gradients(mode, zoo_cache):
    """With dropout on (the fallback path), so the recomputation must replay the same RNG."""
    base, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    batch = _batch(tokenizer)
    grads = {}
    for setting in (False, mode):
        model = copy.deepcopy(base)
        patch_model(model)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1, use_gradient_checkpointing=setting)
        _perturb_adapters(model)
        assert checkpointing_mode(model) == setting
        torch.manual_seed(0)
        grads[setting] = _step(model, batch)[1]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_checkpointing_on_fused_path_and_trainer_request(quantized, zoo_cache):
    base, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    batch = _batch(tokenizer)
    grads = {}
    for setting in (False, "unsloth"):
        model = load_zoo_model("qwen2", cache_dir=zoo_cache, load_in_4bit=True)[0] if quantized else copy.deepcopy(base)
        patch_model(model)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=setting)
        _perturb_adapters(model)
        grads[setting] = _step(model, batch)[1]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads["unsloth"][name], grad, rtol=1e-5, atol=1e-7)
    # The Trainer's default request keeps our mode; a specific one wins. (transformers renamed the
    # method in 5.2x: the Trainer calls whichever the installed release has.)
    name = "activation" if hasattr(type(model.get_base_model()), "activation_checkpointing_enable") else "gradient"
    enable = getattr(model, f"{name}_checkpointing_enable")
    enable(**{f"{name}_checkpointing_kwargs": {"use_reentrant": True}})
    assert checkpointing_mode(model) == "unsloth"
    enable(**{f"{name}_checkpointing_kwargs": {"use_reentrant": False, "preserve_rng_state": False}})
    assert checkpointing_mode(model) is True
    if name == "activation":
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
        assert checkpointing_mode(model) == "unsloth"
        model.activation_checkpointing_enable(every_n_layers=2)
        assert checkpointing_mode(model) is True


def test_same_arguments_twice_is_a_no_op_and_different_ones_say_so(zoo_cache):
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    model = FastLanguageModel.get_peft_model(base, r=8, use_gradient_checkpointing=False)
    assert FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False) is model
    with pytest.raises(ValueError, match=r"r: 8 -> 4"):
        FastLanguageModel.get_peft_model(model, r=4)


def test_random_state_fixes_the_adapters_without_touching_global_rng(zoo_cache):
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = FastLanguageModel.get_peft_model(copy.deepcopy(base), r=4, random_state=7, use_gradient_checkpointing=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = FastLanguageModel.get_peft_model(copy.deepcopy(base), r=4, random_state=7, use_gradient_checkpointing=False)
    c = FastLanguageModel.get_peft_model(copy.deepcopy(base), r=4, random_state=8, use_gradient_checkpointing=False)
    sa, sb, sc = (peft.get_peft_model_state_dict(m) for m in (a, b, c))
    key = next(k for k in sa if "lora_A" in k)
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_initialises_a_16bit_load(bits, zoo_cache):
    """Base weights become the dequantised quantisation Q, and Q + s·B·A is closer to the original
    weights than Q alone (the point of LoftQ); lora_alpha != r checks the scaling is accounted for."""
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = FastLanguageModel.get_peft_model(
        base, r=8, lora_alpha=32, init_lora_weights="loftq", loftq_config={"loftq_bits": bits, "loftq_iter": 2},
        use_gradient_checkpointing=False, target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    q = layer.base_layer.weight
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert not torch.equal(q, original)
    assert (q + delta - original).norm() < 0.9 * (q - original).norm()
    assert model.peft_config["default"].init_lora_weights is True  # what PEFT needs to reload the adapter


BAD_INPUT = [
    ({"r": 0}, "positive integer"),
    ({"r": -4}, "positive integer"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, r"\[0, 1\)"),
    ({"bias": "some"}, "bias must be one of"),
    ({"target_modules": ["q_proj", "query"]}, r"does not have: \['query'\].*gate_proj"),
    ({"target_modules": []}, "empty"),
    ({"modules_to_save": ["embeddings"]}, r"modules_to_save .*\['embeddings'\]"),
    ({"layers_to_transform": [0, 9]}, "outside 0..2"),
    ({"use_gradient_checkpointing": "yes"}, "use_gradient_checkpointing"),
    ({"loftq_config": {"loftq_bits": 4}}, "init_lora_weights='loftq'"),
    ({"qat_scheme": "int4"}, "qat_scheme"),
    ({"lora_rank": 4}, "LoraConfig accepts"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUT)
def test_bad_input_is_refused_before_any_change(kwargs, message, zoo_cache):
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    with pytest.raises((ValueError, TypeError), match=message):
        FastLanguageModel.get_peft_model(base, **kwargs)
    assert not any("lora_" in n for n, _ in base.named_parameters())


def test_loftq_on_a_quantised_model_is_refused(zoo_cache):
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache, load_in_4bit=True)
    with pytest.raises(ValueError, match="load_in_4bit=False"):
        FastLanguageModel.get_peft_model(base, init_lora_weights="loftq")


@pytest.mark.gpu
def test_offloaded_checkpointing_on_cuda_parks_layer_inputs_on_the_host(zoo_cache):
    """On CUDA, "unsloth" checkpointing keeps each layer input in pinned host memory (not on the
    device) and gives the gradients of no checkpointing."""
    from unsloth_like.models import checkpointing

    base, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items()}
    grads, stashes = {}, []
    real_stash = checkpointing._Stash

    class RecordingStash(real_stash):
        def __init__(self, tensor):
            super().__init__(tensor)
            stashes.append(self)

    for setting in (False, "unsloth"):
        model = copy.deepcopy(base).cuda()
        patch_model(model)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=setting)
        _perturb_adapters(model)
        checkpointing._Stash = RecordingStash
        try:
            grads[setting] = _step(model, batch)[1]
        finally:
            checkpointing._Stash = real_stash
    assert len(stashes) == base.config.num_hidden_layers
    assert all(s.tensor.device.type == "cpu" and s.tensor.is_pinned() for s in stashes)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads["unsloth"][name], grad, rtol=1e-4, atol=1e-6)


def test_unpatch_and_unpatched_models_keep_plain_peft_behaviour(zoo_cache):
    """``unpatch`` on a PEFT model restores upstream forwards everywhere; ``FastModel`` (no
    patching) gets adapters from the same call and trains exactly like plain PEFT."""
    from unsloth_like import FastModel, unpatch
    from unsloth_like.testing.zoo import zoo_model_dir

    fast, plain, tokenizer = _pair("mistral", zoo_cache)
    unpatch(fast)
    assert lora_fusion_report(fast) == {}
    assert not any("_unsloth_like_fusion_log" in m.__dict__ for m in fast.modules())
    batch = _batch(tokenizer)
    _assert_same_training_step(fast, plain, batch)

    model, _ = FastModel.from_pretrained(str(zoo_model_dir("mistral", zoo_cache)), load_in_4bit=False)
    generic = FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    assert isinstance(generic, peft.PeftModel) and lora_fusion_report(generic) == {}
    peft.set_peft_model_state_dict(generic, peft.get_peft_model_state_dict(plain))
    _assert_same_training_step(generic, plain, batch)


def test_get_peft_model_on_a_loaded_adapter_dir_is_a_no_op_for_its_settings(zoo_cache, tmp_path):
    """The notebook pattern: reload a saved adapter with from_pretrained, then call
    get_peft_model with the settings it was trained with."""
    from unsloth_like.testing.zoo import zoo_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False)
    assert isinstance(reloaded, peft.PeftModel)
    assert FastLanguageModel.get_peft_model(reloaded, r=8, lora_alpha=16) is reloaded
    assert set(lora_fusion_report(reloaded).values()) == {"fused"}
    with pytest.raises(ValueError, match="lora_alpha: 16 -> 32"):
        FastLanguageModel.get_peft_model(reloaded, r=8, lora_alpha=32)


def test_unpatched_quantised_fp16_norms_are_upcast(zoo_cache):
    """prepare_model_for_kbit_training's norm upcast, for architectures we do not patch (their
    upstream norms may compute in the weights' dtype); other frozen weights keep their dtype."""
    base, _ = load_zoo_model("llama", cache_dir=zoo_cache, load_in_4bit=True, dtype=torch.float16)
    model = FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=False)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert model.get_base_model().lm_head.weight.dtype == torch.float16


@pytest.mark.gpu
def test_qlora_on_cuda_trains_like_plain_peft_and_generates_through_bitsandbytes(zoo_cache):
    """Compiled kernels (Triton NF4 dequantisation and activations) in the fused QLoRA path on a
    GPU, against plain PEFT; under no_grad the NF4 groups use bitsandbytes' inference kernels,
    and greedy generation matches plain PEFT's."""
    from unsloth_like.testing.zoo import zoo_model_dir

    def load():
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(
            zoo_model_dir("llama", zoo_cache), device_map={"": "cuda"},
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]))

    _, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    fast = load()
    patch_model(fast)
    fast = FastLanguageModel.get_peft_model(fast, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    plain = peft.get_peft_model(load(), peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                        target_modules=list(DEFAULT_TARGET_MODULES)))
    _perturb_adapters(fast)
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(fast))
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items()}
    with use_backend("triton"):
        _assert_same_training_step(fast, plain, batch)
        prompt = {k: v[:1, :6] for k, v in batch.items() if k != "labels"}
        fast.eval(), plain.eval()
        ours = fast.generate(**prompt, max_new_tokens=8, do_sample=False)
        theirs = plain.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_a_failure_inside_peft_leaves_the_model_patched(zoo_cache):
    """An option only PEFT can judge (a zero rank in rank_pattern) fails inside peft.get_peft_model,
    after we unbound our forwards to let PEFT wrap: they are bound again before the error."""
    from unsloth_like.models import is_patched

    base, _ = load_zoo_model("llama", cache_dir=zoo_cache)
    patch_model(base)
    with pytest.raises(ValueError):
        FastLanguageModel.get_peft_model(base, rank_pattern={"q_proj": 0})
    assert is_patched(base)
    assert "forward" in base.model.layers[0].mlp.__dict__
