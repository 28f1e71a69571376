"""What our side decides under a launcher (``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them),
checked in this process: placement, refusals, and no effect outside a launcher."""

from __future__ import annotations

import types

import pytest

from unsloth_like.distributed import (check_device_map, check_trainer_processes, launch_device, launched_processes,
                                      sharded_launch)


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")


def test_outside_a_launcher_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launched_processes() == 1 and launch_device() == "cuda"
    check_device_map({"model.layers.0": 0, "model.layers.1": 1})  # one process may spread a model
    check_trainer_processes(types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=1)))


def test_each_process_takes_the_gpu_of_its_local_rank(launcher):
    assert launched_processes() == 4
    assert launch_device() == "cuda:3"
    assert launch_device("cuda:0") == "cuda:0"  # an explicit device is the user's choice


def test_a_device_map_spreading_the_model_is_refused(launcher):
    check_device_map({"": "cuda:3"})
    with pytest.raises(ValueError, match=r"one of 4 started by a launcher .* drop device_map"):
        check_device_map({"model.embed_tokens": 0, "model.layers": 1})


def test_a_trainer_with_fewer_processes_than_launched_is_refused(launcher):
    check_trainer_processes(types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=4)))
    with pytest.raises(RuntimeError, match="started as 4 processes .* set up 1: .* use_cpu=True"):
        check_trainer_processes(types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=1)))


def test_from_pretrained_refuses_a_spread_device_map_before_loading(launcher, tmp_path):
    from unsloth_like import FastLanguageModel

    with pytest.raises(ValueError, match="drop device_map"):
        FastLanguageModel.from_pretrained(str(tmp_path / "never-read"), device_map={"a": 0, "b": 1})


@pytest.mark.parametrize(("env", "engine"), [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
    ({}, None),
])
def test_4bit_weights_are_stored_to_shard_under_an_fsdp_or_zero3_launch(env, engine, monkeypatch, zoo_cache):
    """accelerate launch tells every process its engine; 4-bit weights then take the compute dtype
    as storage (what FSDP and ZeRO-3 can split), and train as before."""
    import torch

    from unsloth_like import FastLanguageModel
    from unsloth_like.testing.zoo import zoo_model_dir

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert sharded_launch() == engine
    model, tokenizer = FastLanguageModel.from_pretrained(zoo_model_dir("llama", zoo_cache), load_in_4bit=True)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == (torch.float32 if engine else torch.uint8)  # float32: the compute dtype on CPU
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    batch = tokenizer(["Name three rivers of Europe."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
