"""Every notebook under notebooks/ runs top to bottom (headless, in a scratch directory)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest


def _execute(nbformat, nbclient, path, workdir):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, zoo_cache, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="install the [dev] extra to run notebooks")
    nbclient = pytest.importorskip("nbclient", reason="install the [dev] extra to run notebooks")
    # The kernel inherits the environment: keep its zoo builds inside this test run's cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(zoo_cache / "xdg"))
    # ...but not the Triton interpreter conftest switched on for this process: a notebook user on
    # CPU runs the kernels' torch references (the interpreter would take minutes per step).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        notebook = _execute(nbformat, nbclient, path, tmp_path)
    except nbclient.exceptions.DeadKernelError:
        # Seen once in four clean CI runs (2026-11-30): the kernel process segfaulted inside libc,
        # not in notebook code, and the rerun passed. One retry; a second death fails the test.
        warnings.warn(f"the kernel running {path.name} died; retrying once", RuntimeWarning)
        notebook = _execute(nbformat, nbclient, path, tmp_path)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "loss " in text and "->" in text
    for name in EXPECTED_FILES[path.stem]:
        assert (tmp_path / name).is_file(), name


# What each notebook leaves behind (relative to its working directory).
EXPECTED_FILES = {
    "quickstart": ["outputs/quickstart/adapter/adapter_model.safetensors"],
    "conversational": ["outputs/llama_lora/adapter_model.safetensors", "outputs/merged/model.safetensors",
                       "outputs/gguf/gguf.Q4_K_M.gguf", "outputs/gguf/Modelfile"],
    "ollama": ["lora_model/adapter_model.safetensors", "model/model.Q8_0.gguf", "model/Modelfile"],
    "grpo": ["grpo_saved_lora/adapter_model.safetensors", "model/model.safetensors", "model/model.Q8_0.gguf"],
    "vision": ["qwen_lora/adapter_model.safetensors", "qwen_lora/processor_config.json",
               "unsloth_finetune/model.safetensors", "unsloth_finetune/preprocessor_config.json"],
}


def test_every_notebook_says_what_it_leaves_behind():
    assert {path.stem for path in NOTEBOOKS} == set(EXPECTED_FILES)
