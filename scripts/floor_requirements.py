"""Print pip requirements pinning every runtime dependency to the lower bound of its range.

    python scripts/floor_requirements.py [EXTRA ...] > floor.txt && pip install -r floor.txt

Each EXTRA named (e.g. ``vision``) has its packages pinned the same way.

`make test-floor` uses this to run the suite against the oldest versions pyproject.toml admits,
so a lower bound is only ever a version we have actually run.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("scripts/floor_requirements.py needs Python >= 3.11 (tomllib).")

from packaging.requirements import Requirement


def floor_pins(pyproject: Path, extras: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    pins = []
    for line in [*project["dependencies"], *(line for extra in extras for line in optional[extra])]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lower) != 1:
            raise SystemExit(f"{requirement.name}: expected exactly one '>=' bound in {line!r}")
        marker = f"; {requirement.marker}" if requirement.marker else ""
        pins.append(f"{requirement.name}=={lower[0]}{marker}")
    return pins


if __name__ == "__main__":
    print("\n".join(floor_pins(Path(__file__).resolve().parent.parent / "pyproject.toml", tuple(sys.argv[1:]))))
