"""Every notebook under notebooks/ runs top to bottom (headless, in a scratch directory)."""

from __future__ import annotations

import json
import re
import sys
import types
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


def _code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_every_notebook_starts_with_the_same_setup_cell():
    """The first code cell installs unsloth_like where it is missing (Colab) and sets ON_COLAB; one
    text for all, so that a fix reaches every notebook."""
    setups = {path.stem: _code_cells(path)[0] for path in NOTEBOOKS}
    assert len(set(setups.values())) == 1, setups
    assert 'ON_COLAB = "google.colab" in sys.modules' in next(iter(setups.values()))


def test_setup_cell_installs_only_where_unsloth_like_is_missing(monkeypatch):
    import importlib.util
    import subprocess

    setup = _code_cells(NOTEBOOKS[0])[0]
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append((argv, kw)))
    namespace: dict = {}
    # The cell's own text, unchanged, as the notebook kernel runs it (nothing is rewritten).
    exec(setup, namespace)  # here unsloth_like is installed: nothing happens
    assert calls == [] and namespace["ON_COLAB"] is False
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "unsloth_like" else real(name))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))  # what Colab preloads
    exec(setup, namespace := {})
    assert namespace["ON_COLAB"] is True
    assert calls == [([sys.executable, "-m", "pip", "install", "--quiet", "unsloth-like[vision]"], {"check": True})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_on_colab_every_notebook_loads_a_hub_model(path):
    """Offline the zoo stands in; the ON_COLAB branch names the model the notebook is about."""
    loading = next(code for code in _code_cells(path) if "from_pretrained(" in code)
    assert re.search(r'"unsloth/[\w.-]+" if ON_COLAB else str\(zoo_model_dir\("\w+"\)\)', loading), loading
