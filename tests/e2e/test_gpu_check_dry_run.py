"""bench/gpu_check.sh is the only route to the GPU figures, and a GPU machine is rare: its plumbing
must not break unseen. Its --dry-run makes a bundle from the build (bench/make_gpu_bundle.sh, no
wheels) and runs the bundle's copy of the script as the GPU machine would, on the CPU: the Python
environment, the ldd check of the bundled binaries (every library from the bundle, the .venv's torch
or glibc/libstdc++), the bundled fixtures, and the CPU-possible part of the tiny-run phases (the
sync-debug runs from images and from a latent cache, NCCL's world of one as Gloo) with the bundled,
stripped binaries. A run that cannot start (a config key the tiny fixtures do not satisfy, a renamed
flag, a library missing from the bundle) fails it."""

from __future__ import annotations

import os
import subprocess
import tarfile

from conftest import ROOT, build_dir


def test_gpu_check_dry_run_of_the_tiny_phases_passes(dde_train, fixtures, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DDE_BUILD_DIR=str(build_dir()), DDE_FIXTURES_DIR=str(fixtures))
    env.pop("DDE_GPU_BUNDLE", None)
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "sync", "nccl"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-2000:] + r.stderr[-2000:]
    lines = summary.splitlines()
    # One line per phase (setup always runs first), then its checks, indented.
    phases = {line.split()[1]: line.split()[0] for line in lines if line.startswith(("PASS ", "FAIL ", "TIMEOUT "))}
    assert phases == {"make_gpu_bundle": "PASS", "setup": "PASS", "nccl": "PASS", "sync": "PASS"}, summary
    passed = [line.split()[1] for line in lines if line.startswith("  PASS ")]
    for check in ("setup_python", "setup_libraries", "setup_ldd", "setup_source_dir", "nccl_world_of_one_backend"):
        assert check in passed, summary
    for family in ("sd15", "sdxl"):
        for suffix in ("", "_bf16", "_cache"):
            assert f"sync_debug_{family}{suffix}" in passed, summary
    assert "FAIL" not in summary and "TIMEOUT" not in summary, summary
    # The device tool returns few files: the summary and one archive of every log.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "logs.tar.gz") as logs:
        names = {os.path.basename(n) for n in logs.getnames()}
    assert {"phase_sync.log", "setup_ldd.log", "bundle.env", "train.log"} <= names, sorted(names)
