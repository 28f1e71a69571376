"""Test harness: Triton interpreter on CPU-only machines, the ``gpu`` marker, the zoo cache, and
plain-bitsandbytes baselines that are right on every host.

``TRITON_INTERPRET`` must be set before anything imports triton (Triton applies it when a kernel
is decorated), so it is set here, at conftest import, before any test module is collected.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
BNB_ROUTING = pytest.StashKey()

if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
        raise RuntimeError("triton was imported before tests/conftest.py could enable its interpreter.")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    # After TRITON_INTERPRET is set (this imports unsloth_like, hence triton). On hosts where
    # bitsandbytes' native CPU dequantisation is wrong, plain HF+PEFT+bitsandbytes baselines use
    # bitsandbytes' own pure-torch implementation in this process; the library's guard is tested
    # separately (tests/models/test_nf4_cpu_guard.py).
    from unsloth_like.testing.bitsandbytes_cpu import correct_bitsandbytes_baselines

    config.stash[BNB_ROUTING] = correct_bitsandbytes_baselines()


def pytest_unconfigure(config: pytest.Config) -> None:
    routing = config.stash.get(BNB_ROUTING, None)
    if routing is not None:
        routing.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    from unsloth_like.host import cpu_facts

    cpu = cpu_facts()
    return [f"host: {cpu.model}, {cpu.cores} cores, AVX512 {'yes' if cpu.avx512 else 'no'} "
            f"(torch CPU capability {cpu.torch_capability})",
            f"host: {config.stash[BNB_ROUTING].describe()}"]


@pytest.fixture(scope="session")
def bnb_routing(pytestconfig: pytest.Config):
    """This process's ``BaselineRouting`` (``.native()`` shows bitsandbytes' own CPU kernel)."""
    return pytestconfig.stash[BNB_ROUTING]


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
