"""Test harness: Triton interpreter on CPU-only machines, the ``gpu`` marker, the zoo cache.

``TRITON_INTERPRET`` must be set before anything imports triton (Triton applies it when a kernel
is decorated), so it is set here, at conftest import, before any test module is collected.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
        raise RuntimeError("triton was imported before tests/conftest.py could enable its interpreter.")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory):
    """One zoo cache for the whole run, shared by pytest-xdist workers (builds are atomic)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp under a shared parent
        root = root.parent
    path = root / "zoo-cache"
    path.mkdir(exist_ok=True)
    return path
