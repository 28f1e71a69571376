"""``model.save_pretrained_gguf`` / ``push_to_hub_gguf`` / ``convert`` / the CLI: what a user of
the notebook API gets, and every refusal before work is lost."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from unsloth_like.cli import main as cli_main
from unsloth_like.kernels import use_backend
from unsloth_like.save.gguf import convert, resolve_method
from unsloth_like.testing import llamacpp
from unsloth_like.testing.zoo import zoo_model_dir

from ..fake_hub import FakeHub
from ..test_save_merged import _trained, move_trainable

needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(), reason=f"needs llama-cpp-python: {llamacpp.INSTALL_HINT}")
PROMPT = "Summarise: the quick brown fox jumps over the lazy dog, twice. 3 + 4 = 7."


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _tensors(path) -> dict:
    return {t.name: (t.tensor_type, np.asarray(t.data).view(np.uint8)) for t in gguf.GGUFReader(path).tensors}


@needs_llama_cpp
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_merged_gguf_runs_the_lora_model_in_llama_cpp(load_in_4bit, zoo_cache, tmp_path):
    """F32 GGUF of a LoRA (and a QLoRA, merged onto the original 16-bit weights) model: llama.cpp's
    logits are the PEFT model's (the 16-bit base with the same adapter, for QLoRA)."""
    model, tokenizer = _trained("llama_k", zoo_cache, load_in_4bit=load_in_4bit)
    [path] = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="f32")
    assert path.name == "gguf.F32.gguf" and (tmp_path / "gguf" / "Modelfile").is_file()
    reference = model if not load_in_4bit else _as_16bit(model, zoo_cache)
    _assert_llama_cpp_runs_it_like(reference, tokenizer(PROMPT).input_ids, path)


def _assert_llama_cpp_runs_it_like(model, ids: list[int], path, gelu_table: bool = False) -> None:
    """llama.cpp's logits for the F32 file ``path`` equal ``model``'s to float32 rounding (plus the
    rounding of llama.cpp's float16 GELU table for GeGLU models, see test_llamacpp_consumer)."""
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    with llamacpp.load(path) as llm:
        assert np.abs(llamacpp.logits(llm, ids) - expected).max() <= llamacpp.f32_logit_bound(expected, gelu_table)


@needs_llama_cpp
@pytest.mark.parametrize(("name", "stop"), [("phi3_k", "<|im_end|>"), ("gemma2_k", "<end_of_turn>"),
                                            ("gemma3_k", "<end_of_turn>")])
def test_notebook_flow_for_phi_and_gemma(name, stop, zoo_cache, tmp_path):
    """from_pretrained -> get_peft_model (Llama target names) -> save_pretrained_gguf: llama.cpp runs
    the LoRA model, and the Modelfile serves the model's chat format."""
    model, tokenizer = _trained(name, zoo_cache)
    [path] = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="f32")
    _assert_llama_cpp_runs_it_like(model, tokenizer(PROMPT).input_ids, path, gelu_table=name.startswith("gemma"))
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "TEMPLATE" in modelfile and f'PARAMETER stop "{stop}"' in modelfile


def _as_16bit(qlora_model, zoo_cache):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("llama_k", zoo_cache))
    reference = peft.get_peft_model(base, qlora_model.peft_config["default"])
    peft.set_peft_model_state_dict(reference, {k: v.float() for k, v in
                                               peft.get_peft_model_state_dict(qlora_model).items()})
    return reference


def test_several_methods_in_one_pass_equal_converting_the_merged_checkpoint(zoo_cache, tmp_path):
    """One call, three files, one merge: each file is tensor for tensor what ``convert`` makes of
    the ``save_pretrained_merged`` checkpoint."""
    model, tokenizer = _trained("qwen2_k", zoo_cache)
    paths = model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method=["q4_k_m", "Q8_0", "quantized"])
    assert [p.name for p in paths] == ["out.Q4_K_M.gguf", "out.Q8_0.gguf"]  # "quantized" is q4_k_m again
    merged = model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    for method, path in zip(["q4_k_m", "q8_0"], paths):
        [converted] = convert(merged, tmp_path / f"ref-{method}.gguf", method, modelfile=False)
        ours, theirs = _tensors(path), _tensors(converted)
        assert list(ours) == list(theirs)
        for name, (qtype, data) in ours.items():
            assert qtype == theirs[name][0] and np.array_equal(data, theirs[name][1]), name
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial files left


def test_modelfile_follows_the_tokenizers_template(zoo_cache, tmp_path):
    model, tokenizer = _trained("qwen2_k", zoo_cache)
    [path] = model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method="q8_0")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n")
    assert "TEMPLATE" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_embedded_template_is_the_runtime_form_of_a_sharegpt_template(zoo_cache, tmp_path):
    """Ollama renders the GGUF's own template (llama.cpp's Jinja engine): no ShareGPT prelude there."""
    from unsloth_like.chat_templates import get_chat_template, inference_template

    model, tokenizer = _trained("qwen2_k", zoo_cache)
    tokenizer = get_chat_template(tokenizer, "chatml", mapping={"role": "from", "content": "value",
                                                                "user": "human", "assistant": "gpt"})
    [path] = model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method="f16")
    embedded = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert embedded == inference_template(tokenizer.chat_template) and "dict(" not in embedded


def test_refusals_come_before_any_work(zoo_cache, tmp_path, monkeypatch):
    model, tokenizer = _trained("qwen2_k", zoo_cache)
    with pytest.raises(ValueError, match=r"Unknown quantization_method 'q4_km'\. Did you mean 'q4_k_m'\?.*q5_k_s"):
        model.save_pretrained_gguf(tmp_path / "a", tokenizer, quantization_method="q4_km")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        model.save_pretrained_gguf(tmp_path / "a", None)
    with pytest.raises(TypeError, match="unexpected arguments"):
        model.save_pretrained_gguf(tmp_path / "a", tokenizer, quantisation="q8_0")
    [path] = model.save_pretrained_gguf(tmp_path / "b", tokenizer, quantization_method="f16")
    before = path.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained_gguf(tmp_path / "b", tokenizer, quantization_method="f16")
    assert path.stat().st_mtime_ns == before
    model.save_pretrained_gguf(tmp_path / "b", tokenizer, quantization_method="f16", overwrite=True)
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OSError, match="Not enough disk space"):
        model.save_pretrained_gguf(tmp_path / "c", tokenizer, quantization_method="q8_0")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_an_interrupted_export_leaves_no_file(zoo_cache, tmp_path, monkeypatch):
    from unsloth_like.save.gguf import writer

    model, tokenizer = _trained("qwen2_k", zoo_cache)
    calls = {"n": 0}
    original = writer.tensor_bytes

    def failing(tensor, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(tensor, qtype)
    monkeypatch.setattr(writer, "tensor_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method=["q8_0", "f16"])
    assert list((tmp_path / "out").iterdir()) == []


def test_the_partial_file_of_a_killed_export_is_removed_by_the_next(zoo_cache, tmp_path, caplog):
    import subprocess
    import sys

    from unsloth_like.save.staging import staging_prefix

    model, tokenizer = _trained("qwen2_k", zoo_cache)
    [target] = model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method="f16")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that no longer runs, as after a SIGKILL mid-export
    abandoned = target.with_name(f"{staging_prefix(target)}{gone.pid}.partial")
    abandoned.write_bytes(b"GGUF" + bytes(1000))
    with caplog.at_level(logging.WARNING, logger="unsloth_like"):
        model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method="f16", overwrite=True)
    assert not abandoned.exists() and target.exists()
    assert any("killed" in r.getMessage() and abandoned.name in r.getMessage() for r in caplog.records)


def test_unsupported_architecture_is_named(tmp_path):
    import transformers

    from unsloth_like.testing.tokenizer import TOKENIZERS, save_tokenizer

    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    save_tokenizer(TOKENIZERS["qwen2"], tmp_path / "gpt2", model_max_length=128)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        convert(tmp_path / "gpt2", tmp_path / "out", "q8_0")
    assert not (tmp_path / "out").exists()


def test_aliases_and_names():
    assert resolve_method("not_quantized") == "f16"
    assert resolve_method("fast_quantized") == "q8_0"
    assert resolve_method("quantized") == resolve_method("q4_k") == resolve_method("Q4_K_M") == "q4_k_m"
    assert resolve_method("q5_k") == "q5_k_m" and resolve_method("q3_k") == "q3_k_m"


def test_cli_converts_a_checkpoint(zoo_cache, tmp_path, capsys):
    source = zoo_model_dir("qwen3_k", zoo_cache)
    assert cli_main(["gguf", str(source), str(tmp_path / "out"), "-q", "q4_k_s", "-q", "bf16"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["Modelfile", f"{source.name}.BF16.gguf", f"{source.name}.Q4_K_S.gguf"]
    assert "Q4_K_S.gguf" in capsys.readouterr().out
    assert cli_main(["gguf", str(source), str(tmp_path / "out"), "-q", "q4_k_s"]) == 2  # exists: no traceback
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(["gguf", str(source), str(tmp_path / "other"), "-q", "q4_ks"]) == 2
    assert "Did you mean 'q4_k_s'?" in capsys.readouterr().err


def test_push_to_hub_gguf_uploads_files_and_modelfile(zoo_cache, caplog):
    model, tokenizer = _trained("qwen2_k", zoo_cache)
    token = "hf_FakeTokenThatMustNeverBeLogged456"
    with FakeHub() as hub, caplog.at_level(logging.DEBUG):
        url = model.push_to_hub_gguf("someone/qwen-gguf", tokenizer, quantization_method=["q8_0", "q4_k_m"],
                                     token=token, endpoint=hub.endpoint)
    assert url.endswith("someone/qwen-gguf")
    files = hub.repos["someone/qwen-gguf"]
    assert set(files) == {"qwen-gguf.Q8_0.gguf", "qwen-gguf.Q4_K_M.gguf", "Modelfile"}
    assert files["qwen-gguf.Q8_0.gguf"][:4] == b"GGUF"
    assert token not in caplog.text
    with pytest.raises(ValueError, match="Unknown quantization_method"):
        model.push_to_hub_gguf("someone/x", tokenizer, quantization_method="q9", token=token)


@needs_llama_cpp
def test_a_full_finetune_is_exported_as_it_is_in_memory(zoo_cache, tmp_path):
    """No adapters: ``from_pretrained`` binds the export too, and the file holds the trained
    weights (not the checkpoint the model came from)."""
    from unsloth_like import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("qwen3_k", zoo_cache)),
                                                         full_finetuning=True, use_gradient_checkpointing=False)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.05)  # as if trained
    [path] = model.save_pretrained_gguf(tmp_path / "full", tokenizer, quantization_method="f32")
    _assert_llama_cpp_runs_it_like(model, tokenizer(PROMPT).input_ids, path)


@needs_llama_cpp
def test_a_trained_head_of_tied_embeddings_is_written(zoo_cache, tmp_path):
    """qwen2_k ties lm_head to the embeddings; training a copy of the head (modules_to_save)
    unties them, so the file must hold an output tensor of its own."""
    model, tokenizer = _trained("qwen2_k", zoo_cache, modules_to_save=["lm_head"])
    [path] = model.save_pretrained_gguf(tmp_path / "untied", tokenizer, quantization_method="f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    _assert_llama_cpp_runs_it_like(model, tokenizer(PROMPT).input_ids, path)


@needs_llama_cpp
def test_new_tokens_and_a_resized_vocabulary(zoo_cache, tmp_path):
    """Added tokens (one special, one not) beyond the checkpoint's 1024 rows: the file's vocabulary
    and embeddings grow with them, and llama.cpp reads both tokens as single ids."""
    from unsloth_like import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama_k", zoo_cache)), load_in_4bit=False)
    tokenizer.add_tokens(["<think>"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model.resize_token_embeddings(1024 + 256)  # past the checkpoint's rows (and keeps rows % 256 for the test)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False,
                                             modules_to_save=["embed_tokens", "lm_head"])
    move_trainable(model, seed=1)
    [path] = model.save_pretrained_gguf(tmp_path / "grown", tokenizer, quantization_method="f32")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}
    assert len(fields["tokenizer.ggml.tokens"]) == 1280
    text = "<|tool|> What is 3 plus 4? <think>"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_tokens_to_ids("<|tool|>") in ids and tokenizer.convert_tokens_to_ids("<think>") in ids
    with llamacpp.load(path) as llm:
        assert llamacpp.tokenize(llm, text, add_bos=True) == ids
    _assert_llama_cpp_runs_it_like(model, ids, path)


def test_the_pre_tokenizer_probe_is_not_reported_as_too_long(zoo_cache):
    """The probe that names llama.cpp's pre-tokenizer is longer than a tokenizer loaded with a short
    max_seq_length; transformers' "sequence length is longer than the specified maximum" warning
    would read as a problem of the user's data."""
    from transformers import AutoTokenizer
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    from unsloth_like.save.gguf.tokenizer import pre_tokenizer_name

    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llama", zoo_cache), model_max_length=16)
    with CaptureLogger(hf_logging.get_logger("transformers.tokenization_utils_base")) as captured:
        assert pre_tokenizer_name(tokenizer) == "llama-bpe"
    assert "longer than the specified maximum" not in captured.out
