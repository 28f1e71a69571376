"""GGUF tests run tiny tensors through many small torch ops: one thread per test worker (two
workers share two cores; more threads only wait on each other)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
