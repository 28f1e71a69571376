"""FastLanguageModel.from_pretrained / FastModel on zoo directories, and its argument checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from unsloth_like import FastLanguageModel, FastModel
from unsloth_like.models import is_patched
from unsloth_like.testing.zoo import zoo_model_dir


def test_defaults_load_4bit_patched_with_a_pad_token(zoo_cache):
    import bitsandbytes as bnb

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("mistral", zoo_cache)), max_seq_length=512)
    assert is_patched(model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # Unsloth's default: 4-bit
    assert model.get_input_embeddings().weight.dtype == torch.float32  # dtype=None on CPU
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 512
    assert model.max_seq_length == 512


def test_16bit_load_trains_with_the_fused_loss(zoo_cache):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen2", zoo_cache)), load_in_4bit=False)
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
    batch = tokenizer(["Describe a red kite."], return_tensors="pt")
    FastLanguageModel.for_training(model)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits is None and torch.isfinite(out.loss)
    FastLanguageModel.for_inference(model)
    assert not model.training and model.config.use_cache and tokenizer.padding_side == "left"
    assert model(**batch).logits is not None
    FastLanguageModel.for_training(model)
    assert model.training and tokenizer.padding_side == "right"


def test_batched_generation_after_for_inference_matches_single_prompts(zoo_cache):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    FastLanguageModel.for_inference(model)
    prompts = ["What is 3 plus 4?", "Describe a red kite in a few words, please."]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    batched = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **kwargs)[:, -6:]
    for row, prompt in zip(batched, prompts):
        single = model.generate(**tokenizer([prompt], return_tensors="pt"), **kwargs)[0, -6:]
        assert torch.equal(row, single)


class _ForceTokenAt:
    """A logits processor that makes ``token`` the only choice at new position ``step``."""

    def __init__(self, prompt_length: int, step: int, token: int):
        self.at, self.token = prompt_length + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0.0
        return scores


def test_generation_stops_at_the_eos_get_chat_template_chose(zoo_cache):
    from unsloth_like.chat_templates import get_chat_template

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    # A base checkpoint (Llama-3.1-8B's own generation_config) stops at end-of-text only.
    model.generation_config.eos_token_id = original_eos = tokenizer.eos_token_id
    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token_id == eot != original_eos
    FastLanguageModel.for_inference(model)
    assert model.generation_config.eos_token_id == [original_eos, eot]  # the base's EOS still stops too

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    length = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                         logits_processor=[_ForceTokenAt(length, 2, eot)])
    assert out.shape[1] == length + 3 and out[0, -1] == eot  # stopped on the chat's turn end
    FastLanguageModel.for_inference(model)
    assert model.generation_config.eos_token_id == [original_eos, eot]  # idempotent


def test_full_finetuning_overrides_the_4bit_default(zoo_cache):
    model, _ = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen3", zoo_cache)), full_finetuning=True)
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_fastmodel_loads_unpatched(zoo_cache):
    model, _ = FastModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    assert not is_patched(model)


def test_max_seq_length_beyond_the_trained_context_sets_linear_rope_scaling(zoo_cache):
    model, _ = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False,
                                                 max_seq_length=5000)
    params = model.config.rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 3.0
    assert params["rope_theta"] == 500000.0  # the model's own base is kept
    assert model.config.max_position_embeddings == 5000


def test_adapter_directory_loads_base_then_adapter_trainable(zoo_cache, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir = zoo_model_dir("qwen3", zoo_cache)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    transformers.AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp_path / "adapter")
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False)
    assert isinstance(model, PeftModel) and is_patched(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.fixture
def llama_dir(zoo_cache):
    """Built before ``nothing_heavy_loads`` patches loading (fixtures set up in argument order)."""
    return zoo_model_dir("llama", zoo_cache)


@pytest.fixture
def nothing_heavy_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model_name": "/nonexistent/model"}, FileNotFoundError, "does not exist"),
        ({"max_seq_length": 0}, ValueError, "max_seq_length must be a positive integer"),
        ({"dtype": torch.float16}, ValueError, "not supported for training on CPU"),
        ({"dtype": "float8"}, ValueError, "dtype must be one of"),
        ({"load_in_4bit": True, "full_finetuning": True}, ValueError, "full_finetuning=True trains every weight"),
        ({"load_in_4bit": True, "load_in_8bit": True}, ValueError, "Choose one of"),
        ({"device_map": "tpu"}, ValueError, "device_map must be"),
    ],
)
def test_bad_arguments_fail_before_loading(kwargs, error, message, llama_dir, nothing_heavy_loads):
    arguments = {"model_name": str(llama_dir), **kwargs}
    with pytest.raises(error, match=message):
        FastLanguageModel.from_pretrained(**arguments)


def test_directory_without_config_is_refused(tmp_path, nothing_heavy_loads):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_hub_id_offline_fails_with_a_clear_message():
    code = "from unsloth_like import FastLanguageModel\nFastLanguageModel.from_pretrained('someorg/no-such-model')\n"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "Could not load 'someorg/no-such-model': it is not a local directory" in done.stderr


def test_8bit_load_trains_on_cpu(zoo_cache):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen3", zoo_cache)), load_in_8bit=True)
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    batch = tokenizer(["Describe a red kite."], return_tensors="pt")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    model.train()
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and embeds.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"load_in_8bit": True}, r"quantization_config \(BitsAndBytesConfig, 4bit\) contradicts load_in_8bit=True"),
        ({"load_in_4bit": False}, "contradicts load_in_4bit=False"),
        ({"full_finetuning": True}, "contradicts full_finetuning=True"),
        ({"load_in_16bit": True}, "contradicts load_in_16bit=True"),
    ],
)
def test_quantization_config_contradicting_a_flag_is_refused(kwargs, message, llama_dir, nothing_heavy_loads):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        FastLanguageModel.from_pretrained(str(llama_dir), quantization_config=config, **kwargs)


def test_reward_model_head_is_loaded_and_its_keywords_checked(zoo_cache):
    directory = str(zoo_model_dir("qwen2", zoo_cache))
    with pytest.raises(ValueError, match="auto_model must be a transformers auto class"):
        FastLanguageModel.from_pretrained(directory, load_in_4bit=False, auto_model="AutoModelForSequenceClassification")
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        FastLanguageModel.from_pretrained(directory, load_in_4bit=False, num_labels=0)
    model, tokenizer = FastLanguageModel.from_pretrained(
        directory, load_in_4bit=False, auto_model=transformers.AutoModelForSequenceClassification, num_labels=2)
    assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.score.out_features == 2
    assert is_patched(model)  # the decoder; the classifier head keeps upstream's forward
    batch = tokenizer(["a kite", "two red kites"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 2)
