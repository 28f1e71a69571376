"""The RL hand-off (``unsloth_like.rl_handoff``): the keywords Unsloth's GRPO / DPO notebooks pass
on TRL 1.x are moved where TRL expects them or checked, contradictions raise, calls without them
reach TRL untouched; and the GRPO notebook's whole flow runs on CPU, through saving."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

trl = pytest.importorskip("trl")

from unsloth_like import FastLanguageModel, SamplingParams  # noqa: E402
from unsloth_like.kernels import use_backend  # noqa: E402
from unsloth_like.rl_handoff import (MAX_PROMPT_LENGTH, install_rl_keywords,  # noqa: E402
                                     uninstall_rl_keywords)
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir  # noqa: E402

CPU = dict(use_cpu=True, report_to="none", bf16=False)


@pytest.fixture(autouse=True)
def _installed():
    install_rl_keywords()
    yield
    install_rl_keywords()  # a test may uninstall; the loader installs them for every later test anyway


def _preferences(n=4):
    return Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                               "rejected": f" Maybe {i}."} for i in range(n)])


def test_configs_without_the_keywords_are_trls_own(tmp_path):
    kwargs = dict(output_dir=str(tmp_path), beta=0.2, temperature=0.7, **CPU)
    shimmed = trl.GRPOConfig(**kwargs).to_dict()
    uninstall_rl_keywords()
    assert not hasattr(trl.GRPOConfig.__init__, "__wrapped__")
    assert trl.GRPOConfig(**kwargs).to_dict() == shimmed
    with pytest.raises(TypeError, match="max_prompt_length"):
        trl.GRPOConfig(output_dir=str(tmp_path), max_prompt_length=10, **CPU)


def test_vllm_sampling_params_become_grpo_config_fields(tmp_path):
    notebook = SamplingParams(min_p=0.1, top_p=1.0, top_k=-1, seed=3407, stop=["<|im_end|>"],
                              include_stop_str_in_output=True)
    config = trl.GRPOConfig(output_dir=str(tmp_path), vllm_sampling_params=notebook, temperature=1.0,
                            max_prompt_length=64, max_completion_length=32, **CPU)
    assert (config.min_p, config.top_k, config.top_p, config.temperature) == (0.1, 0, 1.0, 1.0)
    assert config.__dict__[MAX_PROMPT_LENGTH] == 64 and "max_prompt_length" not in config.to_dict()
    assert copy.deepcopy(config).__dict__[MAX_PROMPT_LENGTH] == 64  # the Trainer copies its args
    moved = trl.RLOOConfig(output_dir=str(tmp_path), vllm_sampling_params=SamplingParams(temperature=0.6,
                                                                                        max_tokens=48), **CPU)
    assert (moved.temperature, moved.max_completion_length) == (0.6, 48)
    with pytest.raises(ValueError, match="give it once"):
        trl.GRPOConfig(output_dir=str(tmp_path), temperature=0.7, vllm_sampling_params=SamplingParams(temperature=0.9))
    with pytest.raises(ValueError, match="num_generations"):
        trl.GRPOConfig(output_dir=str(tmp_path), vllm_sampling_params=SamplingParams(n=4, temperature=1.0))
    with pytest.raises(ValueError, match="no generation step"):
        trl.DPOConfig(output_dir=str(tmp_path), vllm_sampling_params=SamplingParams(), **CPU)
    with pytest.raises(ValueError, match="positive integer"):
        trl.DPOConfig(output_dir=str(tmp_path), max_prompt_length=0, **CPU)


@pytest.mark.slow
def test_dpo_trainer_takes_the_pre_1_0_keywords_onto_its_config(zoo_cache, tmp_path):
    """Zephyr's DPO notebook: ``DPOTrainer(model, ref_model=None, args=DPOConfig(...), beta=0.1,
    tokenizer=tokenizer, max_length=1024, max_prompt_length=512)``."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8)
    config = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, **CPU)
    trainer = trl.DPOTrainer(model, ref_model=None, args=config, beta=0.25, train_dataset=_preferences(),
                             tokenizer=tokenizer, max_length=256, max_prompt_length=64)
    assert trainer.args.beta == 0.25 and trainer.args.max_length == 256 and config.beta == 0.1  # a copy
    assert trainer.processing_class is tokenizer
    trainer.train()
    with pytest.raises(ValueError, match="give the value once"):
        trl.DPOTrainer(model, args=trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, **CPU), beta=0.25,
                       train_dataset=_preferences(), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"4 of 4 prompts in train_dataset are longer than max_prompt_length=3"):
        trl.DPOTrainer(model, args=config, train_dataset=_preferences(), processing_class=tokenizer,
                       max_prompt_length=3)


def _grpo_rewards(completions, completion_ids, **kwargs):
    # the zoo model's samples mostly decode to nothing (ids past its small trained vocabulary): score ids
    return [float(sum(ids) % 7) for ids in completion_ids]


@pytest.mark.slow
def test_grpo_notebook_flow_on_cpu_through_merged_save(zoo_cache, tmp_path):
    """Unsloth's Qwen3 GRPO notebook, shortened: load with ``fast_inference=True``, LoRA, GRPOConfig
    with ``vllm_sampling_params`` and ``max_prompt_length``, two GRPO steps, ``fast_generate`` with
    the saved LoRA, then the merged 16-bit save, reloaded by transformers with the same logits."""
    import transformers

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False,
                                                         fast_inference=True, max_lora_rank=16,
                                                         gpu_memory_utilization=0.9)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=3407,
                                             use_gradient_checkpointing="unsloth")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Count to {i}."}]} for i in range(4)])
    too_short = trl.GRPOConfig(output_dir=str(tmp_path / "x"), max_prompt_length=4, **CPU)
    with pytest.raises(ValueError, match="longer than max_prompt_length=4"):
        trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=_grpo_rewards, args=too_short,
                        train_dataset=dataset)
    sampling = SamplingParams(min_p=0.1, top_p=1.0, top_k=-1, seed=3407, stop=[tokenizer.eos_token],
                              include_stop_str_in_output=True)
    config = trl.GRPOConfig(vllm_sampling_params=sampling, temperature=1.0, learning_rate=5e-3, logging_steps=1,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=2,
                            max_prompt_length=64, max_completion_length=8, max_steps=2, beta=0.04,
                            output_dir=str(tmp_path / "outputs"), **CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with use_backend("torch"):
        trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[_grpo_rewards], args=config,
                                  train_dataset=dataset)
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["reward"])) for e in logged)
    assert any(e["reward_std"] > 0 for e in logged)
    assert any((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before)

    model.save_lora(str(tmp_path / "grpo_saved_lora"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Count to 3."}], tokenize=False,
                                         add_generation_prompt=True)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    (trained,) = model.fast_generate(text, sampling_params=greedy, lora_request=model.load_lora(
        str(tmp_path / "grpo_saved_lora")))
    (base,) = model.fast_generate([text], sampling_params=greedy, lora_request=None)
    assert trained.outputs[0].finished() and base.outputs[0].finished()

    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    inputs = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        got = reloaded(**inputs).logits
    # merged weights W + s*B@A in fp32: rounding of the merge only
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
