"""scripts/slurm/dde_train.sbatch on a real (one-node) SLURM: 2 CPU tasks with Gloo, launched by srun
from the template with its CPU overrides. Completion, preemption (SIGUSR1 to the tasks ->
checkpoint, exit 3 -> `scontrol requeue` -> `--resume`, bit-exact with an uninterrupted run), a
killed rank (the job fails promptly instead of hanging) and a plain scancel (no requeue)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np

from .slurm_helpers import (CPU_SETS, job_info, output_of, rank_pid, read_steps, run_direct, sbatch, scancel, unet,
                           wait_final, wait_for_steps, wait_until)


def tiny_sets(fixtures: Path, run: Path) -> list[str]:
    return [f"model.manifest={fixtures / 'export' / 'sd15' / 'manifest.json'}",
            f"data.index={fixtures / 'shards' / 'sd15' / 'index.json'}", "data.eval_index=",
            f"run.output_dir={run}", *CPU_SETS]


def test_job_runs_two_gloo_ranks_to_completion(slurm_cluster, dde_train, fixtures, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(dde_train, out, tiny_sets(fixtures, run) + ["train.max_steps=6"])
    info = wait_final(job, out, timeout=90)
    log = output_of(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"
    assert info["Restarts"] == "0"
    # srun's variables reached dde_train; the rendezvous port is the per-job one of the script.
    port = 20000 + job % 20000
    assert f"dist: rank 0/2 (local 0) via slurm at {info['NodeList']}:{port}, backend gloo" in log, log[-5000:]
    assert "--resume: no complete checkpoint" in log  # the first launch always passes --resume
    assert "training finished" in log
    assert [s["step"] for s in read_steps(run)] == [1, 2, 3, 4, 5, 6]
    ckpt = run / "checkpoints" / "step-00000006"
    for name in ("COMPLETE", "rank-00000.json", "rank-00001.json", "unet/diffusion_pytorch_model.safetensors"):
        assert (ckpt / name).is_file(), name


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, dde_train, fixtures, tmp_path):
    max_steps = 200  # ~10 s of training here: the signal lands mid-run
    common = [f"train.max_steps={max_steps}", "checkpoint.every=1000", "optim.warmup_steps=0",
              "logging.progress=false"]
    straight = tmp_path / "straight"
    run_direct(dde_train, 2, tiny_sets(fixtures, straight) + common)

    run, out = tmp_path / "preempted", tmp_path / "job.out"
    job = sbatch(dde_train, out, tiny_sets(fixtures, run) + common)
    wait_for_steps(job, run, out, 3)
    # What --signal=USR1@N or a preemption sends: SIGUSR1 to every task of the job's steps
    # (not to the batch shell; that would take `--full` or `--batch`).
    signalled = time.time()
    scancel(job, "--signal=USR1")
    wait_until(job, out, lambda i: int(i["Restarts"]) >= 1, "the requeue", timeout=60)
    requeued = time.time()
    info = wait_final(job, out, timeout=180)
    log = output_of(out)
    print(f"job {job}: requeued {requeued - signalled:.1f} s after the signal, finished "
          f"{time.time() - requeued:.1f} s later")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"
    assert info["Restarts"] == "1", info
    assert "stop requested (signal 10)" in log, log[-5000:]
    assert "requeueing job" in log
    m = re.search(r"resumed from (\S+step-(\d+)) at step (\d+)", log)
    assert m, log[-5000:]
    stopped_at = int(m.group(2))
    assert int(m.group(3)) == stopped_at and 3 <= stopped_at < max_steps, m.group(0)
    assert (run / "checkpoints" / f"step-{stopped_at:08d}" / "COMPLETE").is_file()

    steps, reference = read_steps(run), read_steps(straight)
    assert [s["step"] for s in steps] == list(range(1, max_steps + 1))
    for s, r in zip(steps, reference):
        assert (s["loss"], s["grad_norm"]) == (r["loss"], r["grad_norm"]), s["step"]
    a, b = unet(straight, max_steps), unet(run, max_steps)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_usr1_mid_step_checkpoints_the_last_complete_step_within_seconds(slurm_cluster, dde_train, fixtures,
                                                                        tmp_path):
    # 16 micro-batches per task and step, each slowed to >= 250 ms: a step takes >= 4 s, far more
    # than a stop may take. The signal lands inside step 2: step 1 is what must be checkpointed.
    max_steps = 4
    common = [f"train.max_steps={max_steps}", "train.global_batch=32", "train.micro_batch=1", "checkpoint.every=1000",
              "optim.warmup_steps=0", "logging.progress=false", "logging.per_sample=false"]
    straight = tmp_path / "straight"
    run_direct(dde_train, 2, tiny_sets(fixtures, straight) + common)

    run, out = tmp_path / "preempted", tmp_path / "job.out"
    job = sbatch(dde_train, out, tiny_sets(fixtures, run) + common,
                 extra_env={"DDE_DEBUG_MICRO_BATCH_SLEEP_MS": "250"})
    wait_for_steps(job, run, out, 1, timeout=120)
    time.sleep(1.0)
    signalled = time.time()
    scancel(job, "--signal=USR1")
    marker = run / "checkpoints" / "step-00000001" / "COMPLETE"
    wait_until(job, out, lambda i: marker.is_file(), "the checkpoint of step 1", timeout=30)
    to_checkpoint = time.time() - signalled
    info = wait_final(job, out, timeout=240)
    log = output_of(out)
    print(f"job {job}: checkpoint of step 1 {to_checkpoint:.2f} s after SIGUSR1 (a step takes >= 4 s)")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-5000:]}"
    assert to_checkpoint < 3.0, log[-5000:]
    assert "stop requested (signal 10): checkpoint" in log and "written at step 1;" in log, log[-5000:]
    assert re.search(r"resumed from \S+step-00000001 at step 1", log), log[-5000:]

    steps, reference = read_steps(run), read_steps(straight)
    assert [s["step"] for s in steps] == list(range(1, max_steps + 1))
    for s, r in zip(steps, reference):
        assert (s["loss"], s["grad_norm"]) == (r["loss"], r["grad_norm"]), s["step"]
    a, b = unet(straight, max_steps), unet(run, max_steps)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_a_killed_rank_fails_the_job_instead_of_hanging(slurm_cluster, dde_train, fixtures, tmp_path):
    timeout_s = 20
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(dde_train, out, tiny_sets(fixtures, run) + [
        "train.max_steps=100000", f"dist.timeout_s={timeout_s}", "checkpoint.every=100000",
        "logging.per_sample=false", "logging.progress=false"])
    wait_for_steps(job, run, out, 3)
    pid = rank_pid(job, 1, dde_train)
    assert pid is not None, f"no dde_train task with SLURM_PROCID=1 in job {job}"
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    info = wait_final(job, out, timeout=timeout_s + 60)
    elapsed = time.time() - killed
    log = output_of(out)
    print(f"job {job} ended {info['JobState']} ({info['ExitCode']}) {elapsed:.1f} s after rank 1 was killed "
          f"(dist.timeout_s {timeout_s})")
    assert info["JobState"] == "FAILED", f"{info}\n{log[-5000:]}"
    assert info["Restarts"] == "0"  # a failure is not a preemption: no requeue
    assert elapsed < timeout_s + 15
    assert "task 1: Killed" in log, log[-5000:]
    # The survivor reports the failed collective itself (Gloo sees the peer's socket close)
    # rather than being killed silently by srun's --kill-on-bad-exit.
    assert "[rank 0] [error] collective failed" in log, log[-5000:]
    assert "not requeueing" in log


def test_plain_scancel_stops_the_job_for_good(slurm_cluster, dde_train, fixtures, tmp_path):
    # scancel sends SIGTERM to the tasks too, so they checkpoint and exit 3 as on a preemption;
    # but `scontrol requeue` also requeues finished jobs, so the script must not requeue a job
    # that is no longer RUNNING, or cancelling could never stop the training.
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(dde_train, out, tiny_sets(fixtures, run) + [
        "train.max_steps=100000", "checkpoint.every=100000", "logging.per_sample=false", "logging.progress=false"])
    wait_for_steps(job, run, out, 3)
    scancel(job)
    wait_final(job, out, timeout=60)
    time.sleep(2)  # a wrongly requeued job would be PENDING again by now
    info = job_info(job)
    log = output_of(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log[-5000:]}"
    assert "stop requested (signal 15)" in log, log[-5000:]
    assert "not requeueing" in log and "requeueing job" not in log
    assert sorted((run / "checkpoints").glob("step-*/COMPLETE")), "no checkpoint written on scancel"
