"""Project-level promises: layout, import hygiene, and the README agreeing with what is real."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _pyproject_dependencies() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


def _readme_version_table() -> dict[str, tuple[str, str, str]]:
    section = README.split("## Tested versions", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("package", "---"):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def test_no_top_level_kernels_package_shadows_huggingface_kernels():
    assert not (ROOT / "kernels").exists()
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not any(str(ROOT) == str(Path(p).parent) for p in spec.submodule_search_locations or [])


def test_importing_unsloth_like_leaves_transformers_peft_trl_untouched():
    code = (
        "import sys, unsloth_like\n"
        "print(sorted(m for m in ('transformers', 'peft', 'trl') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_readme_version_table_matches_pyproject():
    dependencies = _pyproject_dependencies()
    table = _readme_version_table()
    assert set(table) == set(dependencies), "README 'Tested versions' must list every runtime dependency"
    for name, requirement in dependencies.items():
        declared, newest, floor = table[name]
        assert Requirement(f"{name}{declared}").specifier == requirement.specifier, name
        assert requirement.specifier.contains(newest), f"{name}: newest tested {newest} outside range"
        lower = next(s.version for s in requirement.specifier if s.operator == ">=")
        assert Version(floor) == Version(lower), f"{name}: floor tested {floor} != lower bound {lower}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^make \w[\w-]*", ci, flags=re.MULTILINE)
    assert commands == ["make test"]
    assert "make test    #" in README


def test_the_unsloth_benchmark_pins_releases_we_support():
    """`make bench-unsloth` runs every variant on Unsloth's pins: they must be inside our ranges."""
    spec = re.search(r"^UNSLOTH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE).group(1).split()
    pins = {Requirement(item).name: Requirement(item) for item in spec}
    assert {"unsloth", "unsloth_zoo", "transformers", "trl"} <= set(pins)
    for name, requirement in _pyproject_dependencies().items():
        if name in pins:
            version = next(iter(pins[name].specifier)).version
            assert requirement.specifier.contains(version), f"bench-unsloth pins {name} {version}, outside {requirement}"


def test_floor_requirements_pin_every_dependency():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "floor_requirements.py")],
                          capture_output=True, text=True, check=True)
    pinned = {Requirement(line).name for line in done.stdout.splitlines()}
    assert pinned == set(_pyproject_dependencies())


def test_floor_requirements_pin_the_named_extras_too():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    vision = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vision"]
    script = str(ROOT / "scripts" / "floor_requirements.py")
    done = subprocess.run([sys.executable, script, "vision"], capture_output=True, text=True, check=True)
    pins = {Requirement(line).name: Requirement(line) for line in done.stdout.splitlines()}
    assert set(pins) == set(_pyproject_dependencies()) | {Requirement(line).name for line in vision}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins.values())
    unknown = subprocess.run([sys.executable, script, "visoin"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "unknown extra(s) ['visoin']" in unknown.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_files_the_package_reads_besides_python(tmp_path):
    """quants.c is compiled on the user's machine (save/gguf/native.py): a wheel without it would
    leave every installed copy on the slow fallback."""
    import importlib.metadata
    import zipfile

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
        need = Requirement(line)  # built without isolation (no download): this environment's tools must do
        if need.name == "wheel":  # setuptools >= 70.1 builds wheels itself
            continue
        try:
            have = importlib.metadata.version(need.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{need.name} is not installed here, so the wheel cannot be built offline")
        if not need.specifier.contains(have):
            pytest.skip(f"{need.name} {have} here does not satisfy the build requirement {line}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data_files = {str(p.relative_to(ROOT)) for p in (ROOT / "unsloth_like").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert "unsloth_like/save/gguf/quants.c" in data_files
    assert data_files <= names, f"missing from the wheel: {sorted(data_files - names)}"
