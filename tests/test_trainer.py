"""TRL hand-off: the legacy SFTTrainer keywords shim and UnslothTrainer's embedding learning rate."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from unsloth_like import FastLanguageModel  # noqa: E402
from unsloth_like.kernels import use_backend  # noqa: E402
from unsloth_like.models import patch_model  # noqa: E402
from unsloth_like.testing.corpus import demo_conversations  # noqa: E402
from unsloth_like.testing.zoo import load_zoo_model  # noqa: E402
from unsloth_like.trainer import install_legacy_sft_keywords, uninstall_legacy_sft_keywords  # noqa: E402


@pytest.fixture
def shim():
    installed_before = hasattr(trl.SFTTrainer.__init__, "__wrapped__")
    original = inspect.unwrap(trl.SFTTrainer.__init__)
    assert install_legacy_sft_keywords()
    yield original
    if not installed_before:
        uninstall_legacy_sft_keywords()


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _model(zoo_cache, **lora):
    model, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    patch_model(model)
    return FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, **lora), tokenizer


def _text_dataset(tokenizer, n=8):
    chats = demo_conversations(n, seed=5)
    return Dataset.from_dict({"text": [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]})


def _training_arguments(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, bf16=False, disable_tqdm=True, **kwargs)


def test_notebook_call_style_trains(shim, zoo_cache, tmp_path):
    """The legacy call of Unsloth's notebooks: tokenizer=, dataset_text_field=, max_seq_length=,
    packing=, dataset_num_proc=, with TrainingArguments."""
    model, tokenizer = _model(zoo_cache)
    arguments = _training_arguments(tmp_path)
    trainer = trl.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=_text_dataset(tokenizer),
                             dataset_text_field="text", max_seq_length=48, packing=False, dataset_num_proc=1,
                             args=arguments)
    assert isinstance(trainer.args, trl.SFTConfig) and trainer.args is not arguments
    assert (trainer.args.max_length, trainer.args.dataset_text_field, trainer.args.dataset_num_proc) == (48, "text", 1)
    assert trainer.processing_class is tokenizer
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= 48
    trainer.train()
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2


def test_without_legacy_keywords_trl_gets_the_call_untouched(zoo_cache, tmp_path, monkeypatch):
    """Inert otherwise: the shim hands TRL's __init__ the very same positional and keyword
    arguments (a recording layer sits between the shim and TRL's function here)."""
    uninstall_legacy_sft_keywords()
    original = trl.SFTTrainer.__init__
    seen = {}

    def recording(self, *args, **kwargs):
        seen.update(args=args, kwargs=dict(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "__init__", recording)
    install_legacy_sft_keywords()
    try:
        model, tokenizer = _model(zoo_cache)
        config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, bf16=False, report_to="none")
        dataset = _text_dataset(tokenizer)
        trainer = trl.SFTTrainer(model, config, train_dataset=dataset, processing_class=tokenizer)
    finally:
        uninstall_legacy_sft_keywords()
    assert seen["args"][0] is model and seen["args"][1] is config and len(seen["args"]) == 2
    assert seen["kwargs"].keys() == {"train_dataset", "processing_class"}
    assert seen["kwargs"]["train_dataset"] is dataset and seen["kwargs"]["processing_class"] is tokenizer
    assert trainer.args is config


def test_conflicting_and_removed_keywords_are_refused(shim, zoo_cache, tmp_path):
    model, tokenizer = _model(zoo_cache)
    dataset = _text_dataset(tokenizer)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_length=256, use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match=r"max_seq_length=64 but its config sets max_length=256"):
        trl.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, max_seq_length=64, args=config)
    with pytest.raises(ValueError, match="no longer exist"):
        trl.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, num_of_sequences=8, args=config)
    with pytest.raises(ValueError, match="both tokenizer= and processing_class="):
        trl.SFTTrainer(model=model, tokenizer=tokenizer, processing_class=object(), train_dataset=dataset, args=config)


def test_from_pretrained_installs_the_shim(zoo_cache):
    from unsloth_like.testing.zoo import zoo_model_dir

    uninstall_legacy_sft_keywords()
    assert not hasattr(trl.SFTTrainer.__init__, "__wrapped__")
    FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False)
    assert hasattr(trl.SFTTrainer.__init__, "__wrapped__")


def test_embedding_learning_rate_gets_its_own_groups(zoo_cache, tmp_path):
    from unsloth_like import UnslothTrainer, UnslothTrainingArguments

    model, tokenizer = _model(zoo_cache, modules_to_save=["embed_tokens", "lm_head"])
    args = UnslothTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                    learning_rate=2e-4, embedding_learning_rate=2e-5, weight_decay=0.01,
                                    use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                                    max_length=48, disable_tqdm=True)
    trainer = UnslothTrainer(model=model, args=args, train_dataset=_text_dataset(tokenizer),
                             processing_class=tokenizer)
    optimizer = trainer.create_optimizer()
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], 0)
        by_lr[group["lr"]] += sum(p.numel() for p in group["params"])
    trainable = dict(model.named_parameters())
    embedding = sum(p.numel() for n, p in trainable.items()
                    if p.requires_grad and ("embed_tokens" in n or "lm_head" in n))
    assert embedding > 0 and by_lr[2e-5] == embedding
    assert by_lr[2e-4] == sum(p.numel() for p in trainable.values() if p.requires_grad) - embedding
    trainer.train()


def test_embedding_learning_rate_bad_input(zoo_cache, tmp_path):
    from unsloth_like import UnslothTrainer, UnslothTrainingArguments

    with pytest.raises(ValueError, match="positive number"):
        UnslothTrainingArguments(output_dir=str(tmp_path), embedding_learning_rate=-1.0, use_cpu=True, bf16=False)
    model, tokenizer = _model(zoo_cache)  # no modules_to_save: nothing to give the rate to
    args = UnslothTrainingArguments(output_dir=str(tmp_path), embedding_learning_rate=1e-5, use_cpu=True,
                                    bf16=False, report_to="none")
    trainer = UnslothTrainer(model=model, args=args, train_dataset=_text_dataset(tokenizer),
                             processing_class=tokenizer)
    with pytest.raises(ValueError, match="modules_to_save"):
        trainer.create_optimizer()


# --- precision default ------------------------------------------------------------------------------

from trl.trainer.base_config import _BaseConfig  # noqa: E402

from unsloth_like import trainer as handoff  # noqa: E402

TRL_CONFIGS = [trl.SFTConfig, trl.DPOConfig, trl.GRPOConfig, trl.KTOConfig, trl.RLOOConfig, trl.RewardConfig]


@pytest.fixture
def precision_shim():
    installed_before = hasattr(_BaseConfig.__post_init__, "__wrapped__")
    assert handoff.install_precision_default()
    yield
    if not installed_before:
        handoff.uninstall_precision_default()


@pytest.fixture
def trl_own_precision():
    """TRL's own __post_init__ inside the test, whatever an earlier test installed."""
    installed_before = hasattr(_BaseConfig.__post_init__, "__wrapped__")
    handoff.uninstall_precision_default()
    yield
    if installed_before:
        handoff.install_precision_default()


@pytest.mark.parametrize("config_class", TRL_CONFIGS, ids=lambda c: c.__name__)
def test_trl_configs_without_precision_flags_follow_the_hardware(config_class, precision_shim, tmp_path):
    """What Unsloth's notebooks write (no bf16/fp16) works here: fp32 on this CPU."""
    config = config_class(output_dir=str(tmp_path))
    assert (config.bf16, config.fp16) == handoff.default_precision()
    if not torch.cuda.is_available():
        assert (config.bf16, config.fp16) == (False, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="TRL's bf16 default is valid on this GPU")
def test_trl_alone_refuses_such_a_config_here(trl_own_precision, tmp_path):
    with pytest.raises(ValueError, match="bf16"):
        trl.SFTConfig(output_dir=str(tmp_path))


@pytest.mark.parametrize("flags", [{"bf16": False}, {"fp16": False, "bf16": False}, {"bf16": True, "use_cpu": True},
                                   {"bf16": False, "use_cpu": True, "gradient_checkpointing": False}], ids=str)
def test_explicit_flags_give_trls_own_config(flags, tmp_path):
    handoff.install_precision_default()
    ours = trl.SFTConfig(output_dir=str(tmp_path), **flags).to_dict()
    handoff.uninstall_precision_default()
    try:
        theirs = trl.SFTConfig(output_dir=str(tmp_path), **flags).to_dict()
    finally:
        handoff.install_precision_default()
    assert ours == theirs


def test_an_explicit_flag_the_hardware_lacks_is_still_refused(precision_shim, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    with pytest.raises(ValueError, match="bf16"):
        trl.SFTConfig(output_dir=str(tmp_path), bf16=True)


def test_the_chosen_pair_reaches_the_config(precision_shim, tmp_path, monkeypatch):
    monkeypatch.setattr(handoff, "default_precision", lambda use_cpu=False: (True, False))
    config = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True)  # bf16 on CPU is valid with use_cpu
    assert (config.bf16, config.fp16) == (True, False)
    monkeypatch.setattr(handoff, "default_precision", lambda use_cpu=False: None)  # another accelerator
    with pytest.raises(ValueError, match="bf16") if not torch.cuda.is_available() else contextlib.nullcontext():
        trl.SFTConfig(output_dir=str(tmp_path))  # TRL's own default then, with its own error here


@pytest.mark.parametrize("cuda, bf16, use_cpu, expected", [
    (True, True, False, (True, False)),    # Ampere and newer: bf16
    (True, False, False, (False, True)),   # T4, V100: fp16 mixed precision
    (True, True, True, (False, False)),    # use_cpu on a GPU machine: fp32
    (False, False, False, (False, False)),  # CPU: fp32
])
def test_default_precision_follows_cuda_and_bf16(cuda, bf16, use_cpu, expected, monkeypatch):
    from unsloth_like import env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(env, "is_bfloat16_supported", lambda: bf16)
    monkeypatch.setattr(handoff, "_other_accelerator", lambda: False)
    assert handoff.default_precision(use_cpu=use_cpu) == expected


def test_from_pretrained_installs_the_precision_default(zoo_cache, trl_own_precision):
    from unsloth_like.testing.zoo import zoo_model_dir

    assert not hasattr(_BaseConfig.__post_init__, "__wrapped__")
    FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False)
    assert hasattr(_BaseConfig.__post_init__, "__wrapped__")


# --- one BOS ------------------------------------------------------------------------------------------


def _bos_trainer(name, zoo_cache, tmp_path, *, legacy=True, text=None, **kwargs):
    from unsloth_like.testing.zoo import zoo_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir(name, zoo_cache)), load_in_4bit=False,
                                                         max_seq_length=96)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    chats = demo_conversations(4, seed=5)
    texts = text or [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    dataset = Dataset.from_dict({"text": texts})
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", dataset_text_field="text",
                           max_length=96, **kwargs)
    if legacy:
        trainer = trl.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, eval_dataset=dataset,
                                 args=config)
    else:
        trainer = trl.SFTTrainer(model, config, train_dataset=dataset, eval_dataset={"a": dataset},
                                 processing_class=tokenizer)
    return trainer, tokenizer, chats, dataset


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-call", "trl-call"])
def test_chat_template_texts_train_with_one_bos(name, legacy, zoo_cache, tmp_path, caplog, shim):
    """Llama 3 and SentencePiece-style templates render BOS into the text and their tokenizers add
    one: the trainer's examples start with one, tokenised as apply_chat_template(tokenize=True)."""
    import logging

    handoff._log_bos_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="unsloth_like.trainer"):
        trainer, tokenizer, chats, dataset = _bos_trainer(name, zoo_cache, tmp_path, legacy=legacy)
    bos = tokenizer.bos_token_id
    evaluation = trainer.eval_dataset if legacy else trainer.eval_dataset["a"]
    for prepared in (trainer.train_dataset, evaluation):
        for ids, chat in zip(prepared["input_ids"], chats):
            assert ids[0] == bos and ids[1] != bos
            intended = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"][:96]
            assert ids[:len(intended)] == intended
    assert tokenizer.decode(trainer.train_dataset[0]["input_ids"]).count(tokenizer.bos_token) == 1
    assert dataset[0]["text"].startswith(tokenizer.bos_token)  # the user's dataset is left as it was
    said = [r for r in caplog.records if "the text's copy is removed" in r.getMessage()]
    assert len(said) == 1  # once, for the train and eval datasets together


def test_trl_alone_would_train_on_two_bos(zoo_cache, tmp_path):
    from unsloth_like.testing.zoo import zoo_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    dataset = Dataset.from_dict({"text": [tokenizer.apply_chat_template(demo_conversations(1)[0], tokenize=False)]})
    config = trl.SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", report_to="none", max_length=96)
    uninstall_legacy_sft_keywords()
    try:
        trainer = trl.SFTTrainer(model, config, train_dataset=dataset, processing_class=tokenizer)
    finally:
        install_legacy_sft_keywords()
    assert trainer.train_dataset[0]["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_texts_without_bos_and_tokenizers_without_bos_are_untouched(zoo_cache, tmp_path):
    from unsloth_like.testing.zoo import zoo_model_dir

    _, llama = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    _, qwen = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False)
    config = trl.SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", report_to="none")
    alpaca = Dataset.from_dict({"text": ["### Instruction:\nAdd 2 and 3.\n\n### Response:\n5"]})  # no BOS in it
    assert handoff.without_duplicate_bos({"processing_class": llama, "train_dataset": alpaca, "args": config}) == {}
    chat = Dataset.from_dict({"text": [qwen.apply_chat_template(demo_conversations(1)[0], tokenize=False)]})
    assert handoff.without_duplicate_bos({"processing_class": qwen, "train_dataset": chat, "args": config}) == {}
    conversational = Dataset.from_dict({"messages": [demo_conversations(1)[0]]})
    assert handoff.without_duplicate_bos({"processing_class": llama, "train_dataset": conversational,
                                          "args": config}) == {}
    rendered = Dataset.from_dict({"text": [llama.apply_chat_template(demo_conversations(1)[0], tokenize=False)]})
    assert handoff.without_duplicate_bos({"processing_class": llama, "train_dataset": rendered, "args": config})
    unprepared = trl.SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", report_to="none",
                               dataset_kwargs={"skip_prepare_dataset": True})  # TRL will not tokenize the texts
    assert handoff.without_duplicate_bos({"processing_class": llama, "train_dataset": rendered,
                                          "args": unprepared}) == {}


def test_formatting_func_output_loses_its_duplicate_bos(zoo_cache, tmp_path):
    from unsloth_like.testing.zoo import zoo_model_dir

    _, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    chats = Dataset.from_dict({"messages": demo_conversations(2, seed=3)})

    def formatting(example):
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)

    config = trl.SFTConfig(output_dir=str(tmp_path), report_to="none")
    updates = handoff.without_duplicate_bos({"processing_class": tokenizer, "train_dataset": chats,
                                             "formatting_func": formatting, "args": config})
    assert set(updates) == {"formatting_func"}
    text = updates["formatting_func"](chats[0])
    assert not text.startswith(tokenizer.bos_token) and tokenizer(text)["input_ids"] == \
        tokenizer.apply_chat_template(chats[0]["messages"], tokenize=True, return_dict=True)["input_ids"]


def test_fp16_chosen_for_a_gpu_without_bf16_refuses_a_bf16_model(precision_shim, tmp_path, monkeypatch):
    """On a T4 the default is fp16 mixed precision; a bf16-loaded model cannot train under it, and
    the error says what to load instead. (The config is built here as on that GPU, then checked.)"""
    import torch

    monkeypatch.setattr(handoff, "default_precision", lambda use_cpu=False: (False, False))
    config = trl.SFTConfig(output_dir=str(tmp_path))
    config.__dict__[handoff._CHOSEN_PRECISION] = (False, True)  # what a T4 gets
    bf16_model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match="load the model with dtype=None"):
        handoff.check_chosen_precision(config, bf16_model)
    handoff.check_chosen_precision(config, torch.nn.Linear(4, 4))  # fp32 / fp16 weights train fine
    explicit = trl.SFTConfig(output_dir=str(tmp_path), bf16=False)
    assert handoff._CHOSEN_PRECISION not in explicit.__dict__  # an explicit choice is the user's
    handoff.check_chosen_precision(explicit, bf16_model)
    assert handoff._CHOSEN_PRECISION not in config.to_dict()


def test_fp16_chosen_for_a_gpu_without_bf16_becomes_fp32_for_gemma3(precision_shim, tmp_path, monkeypatch):
    """Gemma 3's activations overflow fp16: where the hand-off chose fp16 (a T4), a Gemma 3 model
    trains in fp32 (a config copy); a user's explicit fp16=True and other models are left alone."""
    import torch
    import transformers

    monkeypatch.setattr(handoff, "default_precision", lambda use_cpu=False: (False, False))
    config = trl.SFTConfig(output_dir=str(tmp_path))
    config.__dict__[handoff._CHOSEN_PRECISION] = (False, True)  # what a T4 gets
    config.fp16 = True
    gemma = torch.nn.Linear(4, 4)
    gemma.config = transformers.Gemma3Config(text_config={"num_hidden_layers": 1}, vision_config={"num_hidden_layers": 1})
    updates = handoff.fp32_for_fp16_overflows({"args": config, "model": gemma})
    assert updates["args"].fp16 is False and config.fp16 is True
    other = torch.nn.Linear(4, 4)
    other.config = transformers.Qwen2Config()
    assert handoff.fp32_for_fp16_overflows({"args": config, "model": other}) == {}
    explicit = trl.SFTConfig(output_dir=str(tmp_path), bf16=False)
    assert handoff.fp32_for_fp16_overflows({"args": explicit, "model": gemma}) == {}


def test_sft_config_wrapper_is_inert_without_max_seq_length(shim, tmp_path):
    """SFTConfig(max_seq_length=...) is the one thing the config wrapper changes: any other call
    builds exactly the config TRL's own __init__ builds, and uninstalling restores TRL's."""
    wrapped = trl.SFTConfig.__init__
    assert hasattr(wrapped, "__wrapped__")
    settings = dict(output_dir=str(tmp_path), max_length=77, learning_rate=3e-4, bf16=False)
    ours = trl.SFTConfig(**settings)
    theirs = trl.SFTConfig.__new__(trl.SFTConfig)
    inspect.unwrap(wrapped)(theirs, **settings)
    assert ours.to_dict() == theirs.to_dict()
    assert trl.SFTConfig(output_dir=str(tmp_path), max_seq_length=77, bf16=False).max_length == 77
    uninstall_legacy_sft_keywords()
    assert not hasattr(trl.SFTConfig.__init__, "__wrapped__")
    with pytest.raises(TypeError):
        trl.SFTConfig(output_dir=str(tmp_path), max_seq_length=77)
    install_legacy_sft_keywords()
