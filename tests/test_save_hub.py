"""push_to_hub_merged against a local fake Hub: what arrives is the saved model, the token is
sent to the Hub and never logged."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from unsloth_like.kernels import use_backend

from .fake_hub import FakeHub
from .test_save_merged import _logits_and_greedy, _trained

TOKEN = "hf_FakeTokenThatMustNeverBeLogged123"


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def test_push_uploads_the_merged_model(zoo_cache, tmp_path, caplog, capsys):
    model, tokenizer = _trained("qwen2", zoo_cache)
    with FakeHub() as hub, caplog.at_level(logging.DEBUG):
        url = model.push_to_hub_merged("someone/merged-qwen", tokenizer, save_method="merged_16bit", token=TOKEN,
                                       private=True, endpoint=hub.endpoint)
    assert url.endswith("someone/merged-qwen")
    files = hub.repos["someone/merged-qwen"]
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md"} <= set(files)
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err

    download = tmp_path / "download"
    download.mkdir()
    for name, data in files.items():
        (download / name).write_bytes(data)
    expected, _ = _logits_and_greedy(model, tokenizer)
    logits, _ = _logits_and_greedy(transformers.AutoModelForCausalLM.from_pretrained(download), tokenizer)
    assert (expected - logits).abs().max() <= 1e-4


def test_push_lora_and_bad_repo_id(zoo_cache):
    model, tokenizer = _trained("qwen2", zoo_cache)
    with FakeHub() as hub:
        model.push_to_hub_merged("adapter-only", tokenizer, save_method="lora", token=TOKEN, endpoint=hub.endpoint)
    assert "adapter_config.json" in hub.repos["fake-user/adapter-only"]
    with pytest.raises(ValueError, match="repo_id must look like"):
        model.push_to_hub_merged("a/b/c", tokenizer, token=TOKEN)
    with pytest.raises(ValueError, match="save_method must be one of"):
        model.push_to_hub_merged("someone/x", tokenizer, save_method="gguf", token=TOKEN)
    assert torch.is_tensor(next(model.parameters()))
