"""The GPU session script, checked on CPU: a GPU session is too short to find a renamed flag in it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "scripts" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_every_step_calls_a_script_with_flags_it_accepts(session, tmp_path):
    helps: dict[str, str] = {}
    for step in session.plan(tmp_path, "h200"):
        argv = step.argv[1:]
        if argv[:2] == ["-m", "torch.distributed.run"]:  # the launcher's own options, then the script
            argv = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
        if argv[0].startswith(("scripts/", "tests/")):
            script = ROOT / argv[0]
            assert script.exists(), step.name
            if script not in helps:
                helps[script] = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True,
                                               text=True, check=True, timeout=300).stdout
            for flag in (a for a in argv[1:] if a.startswith("--")):
                assert flag in helps[script], f"{step.name}: {script.name} has no {flag}"
        for output in step.outputs:
            assert str(tmp_path / output) in step.argv, f"{step.name} does not write {output}"
    names = [s.name for s in session.plan(tmp_path, "h200")]
    outputs = [o for s in session.plan(tmp_path, "h200") for o in s.outputs]
    # the device tool brings back at most 8 files: the log, the summary and one per step
    assert len(outputs) + 2 <= 8, outputs
    assert names[:2] == ["env", "gpu-tests"]


def test_steps_that_cannot_finish_are_skipped_and_reported(session, tmp_path, monkeypatch):
    quick = session.Step("quick", [sys.executable, "-c", "print('ran')"], timeout=60, min_seconds=1)
    failing = session.Step("failing", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 60, 1)
    slow = session.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=2, min_seconds=1)
    too_big = session.Step("too-big", [sys.executable, "-c", "pass"], timeout=60, min_seconds=10_000)
    peer = session.Step("peer", [sys.executable, "-c", "pass"], 60, 1, requires="a_package_nobody_installed")
    monkeypatch.setattr(session, "plan", lambda out, slug: [quick, failing, slow, too_big, peer])
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--out", str(tmp_path), "--budget", "120"])
    assert session.main() == 1
    report = json.loads((tmp_path / "session.json").read_text())
    statuses = {s["name"]: (s["status"], s["returncode"]) for s in report["steps"]}
    assert statuses == {"quick": ("passed", 0), "failing": ("failed", 3), "slow": ("timed out", None),
                        "too-big": ("skipped", None), "peer": ("skipped", None)}
    assert report["steps"][-1]["reason"] == "a_package_nobody_installed is not installed"
    log = (tmp_path / "session.log").read_text()
    assert "ran" in log and "boom" in log
