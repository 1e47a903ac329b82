"""The set-up script is idempotent: run again (scripts/test.sh has just run it), it installs
nothing and leaves the environment as it was."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def snapshot() -> tuple[str, str]:
    freeze = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout
    packages = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"], capture_output=True, text=True,
                              check=True).stdout
    return freeze, packages


def test_second_setup_run_changes_nothing():
    before = snapshot()
    stamp = ROOT / ".venv/.dde-requirements.sha256"
    stamp_mtime = stamp.stat().st_mtime
    result = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stdout, result.stdout
    assert result.stdout.strip().startswith("setup: ok"), result.stdout
    assert snapshot() == before
    assert stamp.stat().st_mtime == stamp_mtime
