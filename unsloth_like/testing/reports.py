"""Benchmark reports: written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, report: dict) -> None:
    """``report`` as indented JSON at ``out``, through a temporary file renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
