"""The launch examples users copy (``examples/distributed``): the accelerate configs set the engine
our loader reads (QLoRA's shardable storage under FSDP and ZeRO-3), and the example script trains
on 2 CPU processes through ``accelerate launch`` with the DDP config, writing its outputs once."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import transformers

from unsloth_like.distributed import sharded_launch
from unsloth_like.testing.zoo import zoo_model_dir

from .launch import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "distributed"
ENGINES = {"ddp": None, "fsdp2": "FSDP", "zero2": None, "zero3": "DeepSpeed ZeRO-3"}


def _launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config`` gives each process (accelerate's
    own functions; on a machine without a GPU its launcher would not start these engines)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    # what launch_command does before its DeepSpeed launcher
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    prepared = prepare_deepspeed_cmd_env(args)
    return prepared[1] if isinstance(prepared, tuple) else prepared


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_accelerate_config_launches_the_engine_it_names(name, monkeypatch):
    env = _launch_env(EXAMPLES / "accelerate" / f"{name}.yaml")
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    assert env.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    assert sharded_launch() == ENGINES[name]
    if name == "fsdp2":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("zero"):
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1]


@pytest.mark.slow
def test_the_example_trains_on_two_processes_through_accelerate_launch(zoo_cache, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Question {i}: what is {i} plus {i + 3}? Answer: {2 * i + 3}."})
                              for i in range(16)))
    with socket.socket() as free:  # accelerate's static rendezvous needs a port; parallel workers need their own
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    model = zoo_model_dir("llama", zoo_cache)
    done = run(EXAMPLES / "sft.py", "--model", model, "--dataset", data,
               "--output", tmp_path / "out", "--max-steps", 2, "--max-seq-length", 64, "--accumulation", 1,
               launcher=["-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate" / "ddp.yaml"),
                         "--num_processes", "2", "--main_process_port", str(port)],
               timeout=300)  # ~20 s; a process group that hangs at exit must not hold CI for long
    assert "Trained 2 steps on 2 process(es) (MULTI_CPU)" in done.stdout
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert merged.keys() == base.keys()
    assert any((merged[k] - base[k]).abs().max() > 0 for k in base)  # the trained adapter is merged in
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
