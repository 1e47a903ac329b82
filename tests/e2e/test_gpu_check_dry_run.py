"""bench/gpu_check.sh is the only route to the GPU figures, and a GPU machine is rare: its plumbing
must not break unseen. Its --dry-run runs the CPU-possible part of the tiny-run phases here (the
sync-debug runs from images and from a latent cache, NCCL's world of one as Gloo) against the real
binaries and fixtures. A run that cannot start (a config key the tiny fixtures do not satisfy, a
renamed flag) fails it."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT, build_dir


def test_gpu_check_dry_run_of_the_tiny_phases_passes(dde_train, fixtures, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DDE_BUILD_DIR=str(build_dir()))
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "sync", "nccl"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    passed = [line.split()[1] for line in summary.splitlines() if line.startswith("PASS ")]
    for family in ("sd15", "sdxl"):
        for suffix in ("", "_bf16", "_cache"):
            assert f"sync_debug_{family}{suffix}" in passed, summary
    assert "nccl_world_of_one_backend" in passed, summary
    assert "FAIL" not in summary, summary
