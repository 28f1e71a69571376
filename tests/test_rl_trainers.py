"""TRL's preference and RL trainers on our patched LoRA models compute what they compute on
plain transformers + PEFT: same weights, same adapters, same data, same seeds -> the same logged
losses (rewards and KL for the online trainers) and the same LoRA weights after the steps.

TRL 1.16 replaces the model's ``forward`` with its own fused LM head (``add_fused_lm_head``),
which calls our instance forward for generation and our patched decoder layers for the backbone;
these tests hold that the combination stays exact. For a model already wrapped with PEFT (what
``get_peft_model`` returns), TRL 1.16's trainers take as reference a frozen copy of the adapter,
added as a second adapter ``"ref"`` and switched to for the reference pass (our fused path follows
the active adapter); it must stay put while the policy moves (a reference that followed the policy
would keep the KL at 0 and the DPO loss at ln 2). The adapters' B matrices start non-zero. QLoRA
runs put the same NF4 base under both stacks. The runs use the kernels' torch references (the kernels themselves are
compared with them in tests/kernels).
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import transformers
from datasets import Dataset

trl = pytest.importorskip("trl")

from unsloth_like import FastLanguageModel  # noqa: E402
from unsloth_like.kernels import use_backend  # noqa: E402
from unsloth_like.models import is_patched, patch_model  # noqa: E402
from unsloth_like.rl_handoff import install_rl_keywords  # noqa: E402
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir  # noqa: E402

TRL_FUSED_HEAD = hasattr(trl.trainer.utils, "add_fused_lm_head")  # TRL >= 1.11
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# SGD, not Adam: Adam's first step moves every weight by ~lr whatever the size of its gradient, so
# rounding-level gradient differences would show as lr-sized weight differences; SGD keeps them small.
COMMON = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
              report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0)


@pytest.fixture(autouse=True)
def _torch_backend():
    install_rl_keywords()  # from_pretrained installs it; these tests build their models directly
    with use_backend("torch"):
        yield


def _pair(zoo_cache, quantized=False):
    """(plain PEFT model, our model, tokenizer): same base weights (NF4 when ``quantized``), same
    adapters, B non-zero."""
    base, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache, load_in_4bit=quantized)
    plain_base = load_zoo_model("qwen2", cache_dir=zoo_cache, load_in_4bit=True)[0] if quantized else copy.deepcopy(base)
    plain = peft.get_peft_model(plain_base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                            task_type="CAUSAL_LM"))
    patch_model(base)
    ours = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=16, target_modules=TARGETS, random_state=3407,
                                            use_gradient_checkpointing=False)
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(ours))
    _nonzero_b(plain, ours)
    return plain, ours, tokenizer


def _nonzero_b(*models):
    """The same non-zero LoRA B matrices in every model (PEFT starts them at 0)."""
    for model in models:
        generator = torch.Generator().manual_seed(5)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def _train(trainer, uses_fused_head=True):
    """(logged steps, LoRA weights after training, LoRA weights after the first step)."""
    first_step = {}
    trainer.add_callback(_RecordFirstStep(first_step))
    base = trainer.model.get_base_model()
    if uses_fused_head and TRL_FUSED_HEAD:  # TRL's fused LM head runs our CPU kernel on our models only
        assert getattr(base.forward, "_unsloth_like_token_log_probs", False) == is_patched(base)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return logged, weights, first_step


class _RecordFirstStep(transformers.TrainerCallback):
    """The LoRA weights before (``record["before"]``) and after (``record["after"]``) the first
    optimizer step."""

    def __init__(self, record: dict):
        self.record = record

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.record["after"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _assert_same_run(plain, ours, keys=("loss",)):
    (logged_plain, weights_plain, first_plain), (logged_ours, weights_ours, first_ours) = plain, ours
    assert len(logged_plain) == len(logged_ours) == 2
    bf16_updates = any(weight.dtype == torch.bfloat16 for weight in weights_plain.values())
    for step, (step_plain, step_ours) in enumerate(zip(logged_plain, logged_ours)):
        for key in keys:
            # The KL after a bf16-rounded update (QLoRA, below) measures that update itself. Each
            # weight's realised update is a whole number of bf16 ulps, so a weight whose exact update
            # lies near a rounding boundary moves one ulp in one stack and none in the other: up to
            # its whole update. Measured 0.8% (TRL 1.16) and 2.8% (TRL 1.10, full logits) apart;
            # the first step (weights, below) is the tight check.
            relative = 2**-3 if key == "kl" and step > 0 and bf16_updates else 1e-4
            assert step_ours[key] == pytest.approx(step_plain[key], rel=relative, abs=1e-6), key
    assert weights_plain.keys() == weights_ours.keys() == first_plain["after"].keys()
    for name, plain_weight in weights_plain.items():
        if bf16_updates:
            # QLoRA: TRL keeps trainable adapters of a quantised model in bf16, so PEFT and our fused
            # path run the LoRA matmuls in bf16 (with their roundings at different points) and round the
            # gradient and the updated weight to bf16. From identical weights, after the first SGD step:
            # the update (lr x gradient) agrees to a few bf16 ulps (2^-5 of it), the weight to one more
            # ulp of itself (2^-7). The second step starts from weights that already differ, so only
            # its logged values are compared.
            before, after_plain, after_ours = (first_plain["before"][name].float(), first_plain["after"][name].float(),
                                               first_ours["after"][name].float())
            bound = 2**-7 * after_plain.abs() + 2**-5 * (after_plain - before).abs()
            assert ((after_plain - after_ours).abs() <= bound).all(), name
        else:
            # two SGD steps of lr 1e-2: the weights differ by lr x (fp32 rounding of the gradients)
            assert (plain_weight - weights_ours[name]).abs().max().item() < 1e-6, name


def _preferences():
    return Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                               "rejected": f" Maybe {i}."} for i in range(8)])


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_dpo_matches_plain_trl_and_peft(quantized, zoo_cache, tmp_path):
    plain, ours, tokenizer = _pair(zoo_cache, quantized)
    runs = []
    for model in (plain, ours):
        config = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.1, **COMMON)
        runs.append(_train(trl.DPOTrainer(model=model, args=config, train_dataset=_preferences(),
                                          processing_class=tokenizer)))
    _assert_same_run(*runs)
    losses = [entry["loss"] for entry in runs[1][0]]
    assert losses[1] < math.log(2) - 1e-3  # after one update the policy has moved away from the reference


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_kto_matches_plain_trl_and_peft(quantized, zoo_cache, tmp_path):
    plain, ours, tokenizer = _pair(zoo_cache, quantized)
    data = Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus {i}?",
                               "completion": f" It is {2 * i}." if i % 2 else f" Maybe {i}.", "label": bool(i % 2)}
                              for i in range(8)])
    runs = []
    for model in (plain, ours):
        config = trl.KTOConfig(output_dir=str(tmp_path / "kto"), **COMMON)
        runs.append(_train(trl.KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)))
    _assert_same_run(*runs)


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("trainer_name,settings", [("orpo", {}), ("cpo", {}),
                                                   ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0})],
                         ids=["ORPO", "CPO", "SimPO"])
def test_reference_free_preference_trainers_match_plain_trl_and_peft(trainer_name, settings, quantized, zoo_cache,
                                                                     tmp_path):
    """ORPO, CPO and SimPO (``trl.experimental``; CPO with ``loss_type="simpo"``): they take the
    policy's full logits (``model(...).logits``, no labels), which our forward returns."""
    module = pytest.importorskip(f"trl.experimental.{trainer_name}")
    name = trainer_name.upper()
    config_class, trainer_class = getattr(module, f"{name}Config"), getattr(module, f"{name}Trainer")
    plain, ours, tokenizer = _pair(zoo_cache, quantized)
    runs = []
    for model in (plain, ours):
        config = config_class(output_dir=str(tmp_path / trainer_name), beta=0.1, max_length=128, **settings, **COMMON)
        runs.append(_train(trainer_class(model=model, args=config, train_dataset=_preferences(),
                                         processing_class=tokenizer), uses_fused_head=False))
    _assert_same_run(*runs)


@pytest.mark.slow
def test_reward_trainer_matches_plain_trl_and_peft(zoo_cache, tmp_path):
    """A reward model: ``from_pretrained(auto_model=AutoModelForSequenceClassification,
    num_labels=1)`` (decoder patched, the ``score`` head upstream's and trained in full, as PEFT's
    SEQ_CLS task does) under TRL's RewardTrainer."""
    directory = str(zoo_model_dir("qwen2", zoo_cache))
    ours, tokenizer = FastLanguageModel.from_pretrained(directory, load_in_4bit=False, num_labels=1,
                                                        auto_model=transformers.AutoModelForSequenceClassification)
    assert is_patched(ours) and ours.get_output_embeddings() is None
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1,
                                                                            dtype=torch.float32)
    with torch.no_grad():
        plain.score.weight.copy_(ours.score.weight)
    plain.config.pad_token_id = ours.config.pad_token_id
    plain = peft.get_peft_model(plain, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                       task_type="SEQ_CLS"))
    ours = FastLanguageModel.get_peft_model(ours, r=8, lora_alpha=16, target_modules=TARGETS, random_state=3407,
                                            use_gradient_checkpointing=False)
    assert ours.peft_config["default"].task_type == "SEQ_CLS"
    peft.set_peft_model_state_dict(plain, peft.get_peft_model_state_dict(ours))
    _nonzero_b(plain, ours)
    data = Dataset.from_list([{"chosen": f"Question {i}: {i} plus {i} is {2 * i}.",
                               "rejected": f"Question {i}: {i} plus {i} is maybe {i}."} for i in range(8)])
    runs = []
    for model in (plain, ours):
        config = trl.RewardConfig(output_dir=str(tmp_path / "reward"), max_length=64, **COMMON)
        runs.append(_train(trl.RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer),
                           uses_fused_head=False))
    _assert_same_run(*runs)
    score = [dict(m.named_parameters())["base_model.model.score.modules_to_save.default.weight"] for m in (plain, ours)]
    torch.testing.assert_close(score[1], score[0], rtol=0, atol=1e-6)  # the head trained in full, identically


def _length_reward(completions, **kwargs):
    return [len(completion) / 10 for completion in completions]


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("trainer_name", ["GRPO", "RLOO"])
def test_online_rl_matches_plain_trl_and_peft(trainer_name, quantized, zoo_cache, tmp_path):
    """Sampled completions, rewards, the loss and the KL to the reference agree step by step; the
    KL is not 0 after the first update."""
    plain, ours, tokenizer = _pair(zoo_cache, quantized)
    prompts = Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])
    config_class, trainer_class = getattr(trl, f"{trainer_name}Config"), getattr(trl, f"{trainer_name}Trainer")
    runs = []
    for model in (plain, ours):
        config = config_class(output_dir=str(tmp_path / trainer_name), num_generations=2, max_completion_length=8,
                              beta=0.04, **COMMON)
        runs.append(_train(trainer_class(model=model, args=config, train_dataset=prompts, processing_class=tokenizer,
                                         reward_funcs=_length_reward)))
    _assert_same_run(*runs, keys=("loss", "reward", "kl"))
    assert runs[1][0][-1]["kl"] > 0
