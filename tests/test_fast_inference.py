"""Unsloth's fast-inference API on transformers' generate: ``from_pretrained(fast_inference=True,
...)``, ``model.fast_generate`` with vLLM's ``SamplingParams`` and outputs, ``save_lora`` /
``load_lora`` with vLLM's LoRA semantics (``lora_request=None`` is the base model). Each result is
compared with the ``generate`` call it stands for."""

from __future__ import annotations

import logging
import types

import peft
import pytest
import torch

from unsloth_like import FastLanguageModel, SamplingParams
from unsloth_like.models import fast_inference
from unsloth_like.models.sampling import as_sampling_params, completion
from unsloth_like.testing.zoo import zoo_model_dir

PROMPTS = ["Hello there, how", "Count to five:"]


def _load(zoo_cache, **kwargs):
    return FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False, **kwargs)


@pytest.fixture
def lora(zoo_cache):
    """A LoRA model (B non-zero, so the adapter changes what is generated) and its tokenizer."""
    model, tokenizer = _load(zoo_cache, fast_inference=True, max_lora_rank=16)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model, tokenizer


def _greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """What plain ``generate`` gives for one prompt, greedy."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _trainable(model) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


@pytest.mark.slow
def test_greedy_fast_generate_is_generate_and_lora_request_none_is_the_base_model(lora):
    model, tokenizer = lora
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = model.fast_generate(PROMPTS, sampling_params=greedy, lora_request=None)
    assert [o.prompt for o in outputs] == PROMPTS
    model.eval()
    with model.disable_adapter():
        base = [_greedy_ids(model, tokenizer, p, 6) for p in PROMPTS]
    adapted = [_greedy_ids(model, tokenizer, p, 6) for p in PROMPTS]
    model.train()
    assert base != adapted  # the adapter matters, so the comparison below can tell them apart
    for output, expected, prompt in zip(outputs, base, PROMPTS):
        assert output.prompt_token_ids == tokenizer(prompt)["input_ids"]
        (sample,) = output.outputs
        assert sample.token_ids == expected
        assert sample.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert sample.finish_reason == "length" and sample.finished()


@pytest.mark.slow
def test_save_lora_load_lora_samples_with_the_saved_adapter_and_leaves_training_as_it_was(lora, tmp_path):
    model, tokenizer = lora
    model.save_lora(str(tmp_path / "grpo_saved_lora"))
    assert (tmp_path / "grpo_saved_lora" / "adapter_model.safetensors").is_file()
    model.eval()
    expected = _greedy_ids(model, tokenizer, PROMPTS[0], 5)
    model.train()
    with torch.no_grad():  # the in-memory adapter moves on; the saved one is what the request names
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-1)
    trainable, adapters = _trainable(model), set(model.peft_config)
    request = model.load_lora(str(tmp_path / "grpo_saved_lora"))
    assert request.lora_int_id >= 1 and request.lora_path.endswith("grpo_saved_lora")
    (output,) = model.fast_generate(PROMPTS[0], sampling_params=SamplingParams(temperature=0, max_tokens=5,
                                                                             ignore_eos=True), lora_request=request)
    assert output.outputs[0].token_ids == expected
    assert model.training and model.active_adapter == "default"
    assert set(model.peft_config) == adapters and _trainable(model) == trainable


@pytest.mark.slow
def test_load_lora_with_tensors_snapshots_the_adapter_in_memory(lora):
    model, tokenizer = lora
    model.eval()
    expected = _greedy_ids(model, tokenizer, PROMPTS[1], 5)
    model.train()
    request = model.load_lora("unused", load_tensors=True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    (output,) = model.fast_generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                    lora_request=request)
    assert output.outputs[0].token_ids == expected


@pytest.mark.slow
def test_sampling_n_completions_is_seeded_and_honours_stop_tokens(lora):
    model, tokenizer = lora
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=-1, n=3, seed=3407, max_tokens=8, ignore_eos=True)
    first = model.fast_generate(PROMPTS, params)
    again = model.fast_generate(PROMPTS, params)
    assert [len(o.outputs) for o in first] == [3, 3]
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in again]
    assert len({tuple(c.token_ids) for c in first[0].outputs}) > 1  # sampled, not three copies
    greedy = model.fast_generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    ids = greedy[0].outputs[0].token_ids
    stop = ids[3]
    cut = ids.index(stop) + 1
    (stopped,) = model.fast_generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop],
                                                                ignore_eos=True))
    sample = stopped.outputs[0]
    assert sample.token_ids == ids[:cut] and sample.finish_reason == "stop" and sample.stop_reason == stop
    assert sample.text == tokenizer.decode(ids[:cut - 1], skip_special_tokens=True)


def _tokenizer(zoo_cache):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache))


def test_completion_ends_at_eos_stop_token_or_stop_string_like_vllm(zoo_cache):
    tokenizer = _tokenizer(zoo_cache)
    words = tokenizer(" the cat sat on the mat", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    plain = SamplingParams(max_tokens=20)
    ended = completion(0, [*words, eos, eos, eos], plain, {eos}, tokenizer)  # padded with EOS after the end
    assert ended.token_ids == [*words, eos] and ended.finish_reason == "stop" and ended.stop_reason is None
    assert ended.text == tokenizer.decode(words)
    length = completion(1, words, plain, {eos}, tokenizer)
    assert length.finish_reason == "length" and length.token_ids == words and length.index == 1
    ignoring = completion(0, [*words, eos], SamplingParams(ignore_eos=True), {eos}, tokenizer)
    assert ignoring.finish_reason == "length" and ignoring.token_ids == [*words, eos]
    text = tokenizer.decode(words)
    stop = SamplingParams(stop=["sat"])
    cut = completion(0, [*words, eos], stop, {eos}, tokenizer)
    assert cut.finish_reason == "stop" and cut.stop_reason is None  # EOS came first in tokens: it ends the text
    by_string = completion(0, words, stop, {eos}, tokenizer)
    assert by_string.text == text[:text.index("sat")] and by_string.stop_reason == "sat"
    assert "sat" in tokenizer.decode(by_string.token_ids) and len(by_string.token_ids) < len(words)
    kept = completion(0, words, SamplingParams(stop=["sat"], include_stop_str_in_output=True), {eos}, tokenizer)
    assert kept.text == text[:text.index("sat") + 3]


def test_sampling_params_are_vllms_and_unsupported_fields_are_refused():
    assert SamplingParams().max_tokens == 16 and SamplingParams(stop="x").stop == ["x"]
    vllm_like = types.SimpleNamespace(n=2, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.1, seed=3407,
                                      stop=["</s>"], include_stop_str_in_output=True, max_tokens=64,
                                      presence_penalty=0.0, logprobs=None)
    read = as_sampling_params(vllm_like)
    assert (read.n, read.temperature, read.top_k, read.min_p, read.stop, read.max_tokens) == (2, 0.7, 0, 0.1,
                                                                                              ["</s>"], 64)
    with pytest.raises(ValueError, match="presence_penalty"):
        as_sampling_params(types.SimpleNamespace(n=1, presence_penalty=0.5))
    for bad, match in ((dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"), (dict(max_tokens=0),
                       "max_tokens"), (dict(temperature=0, n=2), "greedy"), (dict(stop=[""]), "empty"),
                       (dict(top_k=-2), "top_k")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


@pytest.mark.slow
def test_fast_inference_options_are_checked_and_max_lora_rank_enforced(zoo_cache, caplog, tmp_path):
    with pytest.raises(ValueError, match="max_lora_rank"):
        _load(zoo_cache, fast_inference=True, max_lora_rank=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        _load(zoo_cache, fast_inference=True, gpu_memory_utilization=1.5)
    fast_inference._warn_no_engine_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="unsloth_like.models.fast_inference"):
        model, _ = _load(zoo_cache, fast_inference=True, max_lora_rank=8, gpu_memory_utilization=0.9)
    assert "fast_inference=True" in caplog.text
    with pytest.raises(ValueError, match="max_lora_rank=8"):
        FastLanguageModel.get_peft_model(model, r=16)
    peft_model = FastLanguageModel.get_peft_model(model, r=8)
    peft_model.save_lora(str(tmp_path / "r8"))
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "r8")).r == 8
    plain, _ = _load(zoo_cache)  # without fast_inference: no rank limit, fast_generate still there
    assert FastLanguageModel.get_peft_model(plain, r=16).peft_config["default"].r == 16
    with pytest.raises(ValueError, match="LoRA adapters"):
        plain.save_lora(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="LoRA adapters"):
        plain.fast_generate("hi", lora_request=fast_inference.LoRARequest("1", 1, str(tmp_path / "r8")))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        peft_model.load_lora(str(tmp_path / "missing"))
