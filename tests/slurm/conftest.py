"""Fixtures of the SLURM tests: the real binary, the tiny fixtures, and a one-node SLURM cluster on
this machine (scripts/slurm/local_cluster.sh: installs slurm-wlm + munge if missing, needs root).
The cluster is started once per module and stopped at its end, unless it was already up; a
cluster that cannot start fails the tests (with the daemons' logs), it does not skip them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .slurm_helpers import LOCAL_CLUSTER, ROOT, daemon_logs, slurm_dir, slurm_env


@pytest.fixture(scope="session")
def dde_train() -> Path:
    binary = Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")) / "dde_train"
    if not binary.is_file():
        pytest.fail(f"{binary} not built: run scripts/build.sh (or set DDE_BUILD_DIR)")
    return binary


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = Path(os.environ.get("DDE_FIXTURES_DIR", ROOT / "fixtures"))
    for need in (root / "export" / "sd15" / "manifest.json", root / "shards" / "sd15" / "index.json"):
        if not need.is_file():
            pytest.fail(f"{need} missing: run scripts/prepare_tiny.sh (or set DDE_FIXTURES_DIR)")
    return root


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), command], env=slurm_env(DDE_SLURM_DIR=str(slurm_dir())),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster; SLURM_CONF is set for the clients the tests call."""
    was_up = _cluster("status", 60).returncode == 0
    try:
        r = _cluster("start", 900)  # the first start may apt-get install slurm-wlm and munge
        problem = "" if r.returncode == 0 else f"failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    except subprocess.TimeoutExpired as e:
        problem = f"timed out: {e}"
    if problem:
        logs = daemon_logs()
        if not was_up:
            _cluster("stop", 180)  # whatever did start
        pytest.fail(f"local_cluster.sh start {problem}\n{logs}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(slurm_dir() / "slurm.conf"))
        yield slurm_dir()
    if not was_up:
        _cluster("stop", 180)
