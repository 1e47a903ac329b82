"""Helpers of the SLURM tests: submitting scripts/slurm/dde_train.sbatch to the one-node cluster of
scripts/slurm/local_cluster.sh, following the job with `scontrol show job` (there is no slurmdbd,
so no sacct; the cluster keeps finished jobs for MinJobAge = 1 h), and launching a reference run
of the same binary directly with torchrun's variables (as tests/e2e/test_multiprocess.py does).
Kept out of conftest.py, which holds only the fixtures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = ROOT / "scripts" / "slurm" / "dde_train.sbatch"
LOCAL_CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
CONFIG = "configs/tiny_dde.yaml"
# The script's #SBATCH lines ask for 8 GPU tasks per node; the CPU/Gloo variant overrides them.
CPU_JOB = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10"]
CPU_SETS = ["run.device=cpu", "dist.backend=gloo"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def slurm_dir() -> Path:
    return Path(os.environ.get("DDE_SLURM_DIR", "/tmp/dde-slurm"))


def slurm_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, SLURM_CONF=str(slurm_dir() / "slurm.conf"))
    env.update(extra)
    return env


def daemon_logs(lines: int = 60) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log", "munged.log"):
        f = slurm_dir() / "log" / name
        if f.is_file():
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {f}\n" + "\n".join(tail))
    return "\n".join(out)


def sbatch(binary: Path, out_file: Path, sets: list[str], *, sbatch_args: list[str] | None = None,
           extra_env: dict[str, str] | None = None) -> int:
    """Submits the template with the CPU overrides (and extra_env exported to the tasks); returns the job id."""
    cmd = ["sbatch", "--parsable", *CPU_JOB, "--job-name=dde-slurm-test", f"--output={out_file}",
           *(sbatch_args or []), str(SBATCH_SCRIPT)]
    for s in sets:
        cmd += ["--set", s]
    env = slurm_env(CONFIG=CONFIG, DDE_BIN=str(binary), OMP_NUM_THREADS="1", **(extra_env or {}))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sbatch failed: {r.stdout}{r.stderr}\n{daemon_logs()}"
    return int(r.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=slurm_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
    info = {}
    for field in r.stdout.split():
        key, _, value = field.partition("=")
        info.setdefault(key, value)
    return info


def scancel(job: int, *args: str) -> None:
    subprocess.run(["scancel", *args, str(job)], env=slurm_env(), capture_output=True, text=True, timeout=30)


def output_of(out_file: Path) -> str:
    return out_file.read_text(errors="replace") if out_file.is_file() else "(no job output yet)"


def wait_until(job: int, out_file: Path, done, what: str, timeout: float) -> dict[str, str]:
    """Polls the job until done(info) is true; on timeout cancels it and fails with its output."""
    deadline = time.time() + timeout
    while True:
        info = job_info(job)
        if done(info):
            return info
        if info["JobState"] in FINAL_STATES or time.time() > deadline:
            if info["JobState"] not in FINAL_STATES:
                scancel(job)
            raise AssertionError(f"job {job}: {what} not reached within {timeout} s (state {info['JobState']}, "
                                 f"restarts {info.get('Restarts')})\n--- job output\n{output_of(out_file)[-5000:]}")
        time.sleep(0.3)


def wait_final(job: int, out_file: Path, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        info = job_info(job)
        if info["JobState"] in FINAL_STATES:
            return info
        if time.time() > deadline:
            scancel(job)
            raise AssertionError(f"job {job} still {info['JobState']} after {timeout} s\n--- job output\n"
                                 f"{output_of(out_file)[-5000:]}")
        time.sleep(0.3)


def read_steps(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").is_file():
        return []
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") not in ("pair", "eval"):
            steps.append(rec)
    return steps


def wait_for_steps(job: int, run: Path, out_file: Path, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(read_steps(run)) >= n:
                return
        except json.JSONDecodeError:  # a line being written
            pass
        state = job_info(job)["JobState"]
        if state in FINAL_STATES:
            raise AssertionError(f"job {job} ended ({state}) before step {n}\n{output_of(out_file)[-5000:]}")
        time.sleep(0.1)
    scancel(job)
    raise AssertionError(f"job {job}: fewer than {n} steps after {timeout} s\n{output_of(out_file)[-5000:]}")


def rank_pid(job: int, procid: int, binary: Path) -> int | None:
    """The pid of the dde_train task with SLURM_PROCID=procid of the job, from /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if not cmd or Path(cmd[0].decode(errors="replace")).name != binary.name:
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if env.get(b"SLURM_JOB_ID") == str(job).encode() and env.get(b"SLURM_PROCID") == str(procid).encode():
            return int(proc.name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_direct(binary: Path, world: int, sets: list[str], timeout: float = 300) -> None:
    """The same training without SLURM: `world` ranks with torchrun's variables, to completion."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [str(binary), "--config", str(ROOT / CONFIG)]
        for s in sets:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            errors.append(err[-3000:])
    assert not errors, f"reference run failed: {errors}"


def unet(run: Path, step: int) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "unet" / "diffusion_pytorch_model.safetensors"))
