"""``model.generate(input_ids=tokenizer.apply_chat_template(..., return_tensors="pt"))``: the
notebooks' call, with the ``BatchEncoding`` transformers 5 returns and the tensor older releases
returned, with and without a streamer, on our loaded and PEFT models."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding, TextStreamer

from unsloth_like import FastLanguageModel
from unsloth_like.kernels import use_backend
from unsloth_like.models.generation import unpack_encoded_inputs
from unsloth_like.testing.zoo import zoo_model_dir

MESSAGES = [{"role": "user", "content": "Continue the sequence: 1, 1, 2, 3, 5, 8,"}]


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


@pytest.fixture
def llama(zoo_cache):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False,
                                                         max_seq_length=128)
    return model, tokenizer


def _greedy(**kwargs):
    return {"max_new_tokens": 6, "do_sample": False, **kwargs}


def test_batch_encoding_as_input_ids_generates_like_spreading_it(llama):
    model, tokenizer = llama
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(inputs, BatchEncoding):  # transformers < 5: the tensor itself
        inputs = BatchEncoding({"input_ids": inputs, "attention_mask": torch.ones_like(inputs)})
    expected = model.generate(**inputs, **_greedy())
    assert torch.equal(model.generate(input_ids=inputs, **_greedy()), expected)
    assert torch.equal(model.generate(inputs, **_greedy()), expected)
    assert torch.equal(model.generate(input_ids=inputs["input_ids"], **_greedy()), expected)  # the old style


def test_left_padded_batch_uses_the_encodings_attention_mask(llama):
    model, tokenizer = llama
    FastLanguageModel.for_inference(model)  # pads on the left
    conversations = [MESSAGES, [{"role": "user", "content": "Hi"}]]
    inputs = tokenizer.apply_chat_template(conversations, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt", padding=True, return_dict=True)
    assert (inputs["attention_mask"] == 0).any()
    expected = model.generate(**inputs, **_greedy())
    assert torch.equal(model.generate(input_ids=inputs, **_greedy()), expected)
    # an explicit attention_mask wins over the encoding's
    ones = torch.ones_like(inputs["attention_mask"])
    assert torch.equal(model.generate(input_ids=inputs, attention_mask=ones, **_greedy()),
                       model.generate(input_ids=inputs["input_ids"], attention_mask=ones, **_greedy()))


def test_text_streamer_prints_what_generate_returns(llama, capsys):
    model, tokenizer = llama
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    capsys.readouterr()
    output = model.generate(input_ids=inputs, streamer=TextStreamer(tokenizer, skip_prompt=True), **_greedy())
    printed = capsys.readouterr().out
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert printed.strip() == tokenizer.decode(new_tokens, skip_special_tokens=False).strip()


def test_peft_models_accept_it_too(llama):
    model, tokenizer = llama
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert torch.equal(model.generate(input_ids=inputs, **_greedy()), model.generate(**inputs, **_greedy()))


def test_a_mapping_without_input_ids_is_a_clear_error():
    with pytest.raises(ValueError, match="mapping without 'input_ids'"):
        unpack_encoded_inputs((), {"input_ids": {"attention_mask": torch.ones(1, 3)}})
    args, kwargs = unpack_encoded_inputs((), {"input_ids": torch.ones(1, 3, dtype=torch.long), "max_new_tokens": 2})
    assert args == () and set(kwargs) == {"input_ids", "max_new_tokens"}  # tensors pass through untouched
