"""The benchmark and session scripts under ``scripts/``, imported as modules by their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def import_script(name: str):
    """``scripts/<name>.py`` as module ``name`` (registered in ``sys.modules`` for pickling and
    dataclasses; ``forget_script`` removes it)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def forget_script(name: str) -> None:
    sys.modules.pop(name, None)
