"""``unsloth-like export``: a trained adapter directory merged into its base (checked against PEFT's
own merge, reloaded by plain transformers) or written as GGUF files with a Modelfile; bad input
is one sentence and exit status 2, before anything is written."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from unsloth_like import FastLanguageModel
from unsloth_like.cli import main as cli_main
from unsloth_like.testing.zoo import zoo_model_dir


@pytest.fixture
def adapter_dir(zoo_cache, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(zoo_model_dir("llama", zoo_cache)), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_export_merges_the_adapter_as_peft_does(adapter_dir, zoo_cache, tmp_path, capsys):
    assert cli_main(["export", str(adapter_dir), str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(zoo_model_dir("llama", zoo_cache), dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    assert max((ours[k].float() - reference[k].float()).abs().max().item() for k in ours) <= 1e-6  # fp32 merge
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").vocab_size > 0


def test_export_writes_gguf_files_and_a_modelfile(adapter_dir, tmp_path, capsys):
    assert cli_main(["export", str(adapter_dir), str(tmp_path / "gguf"), "--to", "gguf",
                     "-q", "q8_0", "-q", "q4_k_m"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["gguf.Q8_0.gguf", "gguf.Q4_K_M.gguf"]
    assert (tmp_path / "gguf" / "Modelfile").is_file()


def test_export_refuses_what_it_cannot_do_before_writing(adapter_dir, zoo_cache, tmp_path, capsys):
    model_dir = zoo_model_dir("llama", zoo_cache)
    assert cli_main(["export", str(model_dir), str(tmp_path / "out")]) == 2
    assert "is not an adapter directory (no adapter_config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli_main(["export", str(adapter_dir), str(tmp_path / "out"), "-q", "q4_k_m"]) == 2
    assert "-q/--no-modelfile apply to --to gguf only" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    assert cli_main(["export", str(adapter_dir), str(tmp_path / "taken")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
