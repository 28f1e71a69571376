"""Benchmark reports: written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, report: dict) -> None:
    """``report`` as indented JSON at ``out``, through a temporary file renamed into place."""
    write_atomically(out, json.dumps(report, indent=1).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path``, written to a hidden partial file first and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)
