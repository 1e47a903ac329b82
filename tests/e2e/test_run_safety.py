"""Runs that never lose work (the real dde_train binary on the tiny fixtures): a fresh run refuses a
folder with checkpoints unless --resume or --overwrite; a stop signal (SIGUSR1, SIGTERM, SIGINT) is
polled before every micro-batch, drops the partial step and checkpoints the last complete one, from
which --resume continues bit-identically; a resume that changes the data stream is refused; a
damaged trainer_state.json is an error naming the file. A stop during a held-out evaluation is
polled before every batch of it: the evaluation is dropped, the step checkpointed, and the resumed
run evaluates that step again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, read_metrics, read_records, run_train, tiny_overrides, train_command

# 32 micro-batches per optimizer step on one rank: a step long enough to be interrupted inside.
MANY_MICRO = ["train.global_batch=32", "train.micro_batch=1", "train.max_steps=3", "checkpoint.every=100",
              "optim.warmup_steps=0", "logging.per_sample=true", "logging.progress=false"]
# measured, not computed
TIMING = {"pairs_per_s", "data_wait_frac", "decode_cpu", "mem_held_mb", "mem_peak_mb", "mem_forward_peak_mb"}


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def complete_steps(run: Path) -> list[int]:
    return sorted(int(m.parent.name.split("-")[1]) for m in (run / "checkpoints").glob("step-*/COMPLETE"))


def assert_same_run(a: Path, b: Path, step: int) -> None:
    """Bit-identical weights, optimizer/correction state and metrics rows at `step`."""
    for name in ("unet/diffusion_pytorch_model.safetensors", "training_state.safetensors"):
        ta, tb = load_file(str(checkpoint_dir(a, step) / name)), load_file(str(checkpoint_dir(b, step) / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert np.array_equal(ta[k], tb[k]), f"{name}: {k}"
    steps_a, pairs_a = read_metrics(a)
    steps_b, pairs_b = read_metrics(b)
    assert [{k: v for k, v in s.items() if k not in TIMING} for s in steps_a] == \
           [{k: v for k, v in s.items() if k not in TIMING} for s in steps_b]
    assert pairs_a == pairs_b


@pytest.fixture(scope="module")
def straight(dde_train, fixtures, tmp_path_factory) -> Path:
    """The uninterrupted reference of the MANY_MICRO runs."""
    run = tmp_path_factory.mktemp("safety") / "straight"
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", run) + MANY_MICRO)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_fresh_run_refuses_a_folder_with_checkpoints_unless_resume_or_overwrite(dde_train, fixtures, tmp_path):
    run = tmp_path / "run"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=2", "checkpoint.every=2",
                                                    "logging.per_sample=false"]
    assert run_train(dde_train, "tiny_dde.yaml", sets).returncode == 0
    marker = checkpoint_dir(run, 2) / "COMPLETE"
    metrics_before = (run / "metrics.jsonl").read_text()
    mtime = marker.stat().st_mtime_ns

    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 1
    assert "holds the checkpoints of an earlier run" in r.stderr and str(run) in r.stderr, r.stderr[-3000:]
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (run / "metrics.jsonl").read_text() == metrics_before, "a refused run touched metrics.jsonl"
    assert marker.stat().st_mtime_ns == mtime and complete_steps(run) == [2]

    r = run_train(dde_train, "tiny_dde.yaml", sets, resume=True, flags=["--overwrite"])
    assert r.returncode == 2, r.stderr[-3000:]  # usage: the two exclude each other

    r = run_train(dde_train, "tiny_dde.yaml", sets[:-3] + ["train.max_steps=1", "checkpoint.every=100"],
                  flags=["--overwrite"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--overwrite: deleted {run / 'checkpoints'}" in r.stderr
    assert complete_steps(run) == [1], "the old run's checkpoints survived --overwrite"
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == [1]


def test_stop_mid_step_checkpoints_the_last_complete_step_and_resume_is_bit_identical(dde_train, fixtures,
                                                                                      tmp_path, straight):
    run = tmp_path / "stopped"
    sets = tiny_overrides(fixtures, "sd15", run) + MANY_MICRO
    # SIGUSR1 raised before micro-batch 13 of step 2 (of 32): steps 2's 13 micro-batches are dropped.
    r = run_train(dde_train, "tiny_dde.yaml", sets, env={"DDE_DEBUG_STOP_AT": "2:13"})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "stop requested (signal 10)" in r.stderr and "written at step 1" in r.stderr, r.stderr[-3000:]
    assert complete_steps(run) == [1]
    position = json.loads((checkpoint_dir(run, 1) / "rank-00000.json").read_text())["loader"]
    assert position["pairs_consumed"] == 32, position  # the end of step 1, not 32 + 13
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == [1]

    r = run_train(dde_train, "tiny_dde.yaml", sets, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 1" in r.stderr
    assert_same_run(straight, run, 3)


def test_a_stop_between_steps_does_not_checkpoint_the_same_step_twice(dde_train, fixtures, tmp_path):
    run = tmp_path / "between"
    sets = tiny_overrides(fixtures, "sd15", run) + MANY_MICRO + ["checkpoint.every=1"]
    # Raised before the first micro-batch of step 2: as if it came during step 1's update.
    r = run_train(dde_train, "tiny_dde.yaml", sets, env={"DDE_DEBUG_STOP_AT": "2:0"})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "already written at step 1" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("checkpoint: ") == 1, r.stderr[-3000:]
    assert complete_steps(run) == [1]


def test_a_stop_in_the_first_step_writes_no_checkpoint(dde_train, fixtures, tmp_path):
    run = tmp_path / "first"
    sets = tiny_overrides(fixtures, "sd15", run) + MANY_MICRO
    r = run_train(dde_train, "tiny_dde.yaml", sets, env={"DDE_DEBUG_STOP_AT": "1:5"})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "no step completed, nothing to checkpoint" in r.stderr, r.stderr[-3000:]
    assert complete_steps(run) == []


# Held-out evaluation at steps 0, 2 and 4 (43 pairs, micro-batch 2: 22 batches each).
EVALUATED = ["train.global_batch=4", "train.micro_batch=2", "train.max_steps=4", "checkpoint.every=100",
             "eval.every=2", "optim.warmup_steps=0", "logging.progress=false"]


def eval_records(run: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in read_records(run, "eval")]


@pytest.fixture(scope="module")
def evaluated(dde_train, fixtures, tmp_path_factory) -> Path:
    """The uninterrupted reference of the EVALUATED runs."""
    run = tmp_path_factory.mktemp("safety") / "evaluated"
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", run, held_out=True) + EVALUATED)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [e["step"] for e in eval_records(run)] == [0, 2, 4]
    return run


# 2:5 - mid-run: step 2 is checkpointed by the stop; 4:0 - the final evaluation, after the last
# checkpoint: the resumed run only evaluates.
@pytest.mark.parametrize("stop_in_eval,written", [("2:5", "written at step 2"), ("4:0", "already written at step 4")])
def test_a_stop_during_the_held_out_evaluation_checkpoints_and_the_resume_evaluates_again(
        dde_train, fixtures, tmp_path, evaluated, stop_in_eval, written):
    run = tmp_path / "stopped"
    sets = tiny_overrides(fixtures, "sd15", run, held_out=True) + EVALUATED
    r = run_train(dde_train, "tiny_dde.yaml", sets, env={"DDE_DEBUG_STOP_IN_EVAL": stop_in_eval})
    assert r.returncode == 3, r.stderr[-3000:]
    step = int(stop_in_eval.split(":")[0])
    assert f"eval step {step}: stopped by a stop request" in r.stderr, r.stderr[-3000:]
    assert written in r.stderr, r.stderr[-3000:]
    assert complete_steps(run)[-1] == step
    assert [e["step"] for e in eval_records(run)] == [e for e in (0, 2) if e < step]

    r = run_train(dde_train, "tiny_dde.yaml", sets, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert eval_records(run) == eval_records(evaluated)
    assert_same_run(evaluated, run, 4)


def wait_for_step(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run, live=True)[0]) >= n:
                return
        except json.JSONDecodeError:  # a line being written
            pass
        assert proc.poll() is None, f"dde_train exited early ({proc.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} steps after {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_a_signal_from_outside_mid_step_checkpoints_within_seconds(dde_train, fixtures, tmp_path, straight, signum):
    run = tmp_path / "outside"
    sets = tiny_overrides(fixtures, "sd15", run) + MANY_MICRO
    # 32 micro-batches of >= 250 ms: a step takes >= 8 s, so the signal lands mid-step.
    env = dict(os.environ, DDE_DEBUG_MICRO_BATCH_SLEEP_MS="250")
    proc = subprocess.Popen(train_command(dde_train, "tiny_dde.yaml", sets), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 1, proc)
    time.sleep(1.0)  # inside step 2
    signalled = time.time()
    proc.send_signal(signum)
    while not complete_steps(run) and proc.poll() is None:
        time.sleep(0.02)
    to_checkpoint = time.time() - signalled
    _, err = proc.communicate(timeout=120)
    print(f"signal {signum}: checkpoint of step {complete_steps(run)} {to_checkpoint:.2f} s after the signal")
    assert proc.returncode == 3, err[-3000:]
    assert f"stop requested (signal {int(signum)})" in err
    assert complete_steps(run) == [1], err[-3000:]
    assert to_checkpoint < 4.0  # a micro-batch and a checkpoint, not the rest of the step (>= 7 s)

    r = run_train(dde_train, "tiny_dde.yaml", sets, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, run, 3)


def test_resume_refuses_data_stream_changes_and_logs_the_others(dde_train, fixtures, tmp_path):
    run = tmp_path / "cfg"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=1", "checkpoint.every=1",
                                                    "logging.per_sample=false"]
    assert run_train(dde_train, "tiny_dde.yaml", sets).returncode == 0
    for change, key in [("run.seed=1", "run.seed"), ("train.global_batch=8", "train.global_batch"),
                        ("data.keep_ties=true", "data.keep_ties"), ("data.random_flip=false", "data.random_flip")]:
        r = run_train(dde_train, "tiny_dde.yaml", sets + ["train.max_steps=2", change], resume=True)
        assert r.returncode == 1, (change, r.stderr[-3000:])
        assert "changes the data stream" in r.stderr and key in r.stderr, r.stderr[-3000:]
        assert "config.yaml" in r.stderr
    assert complete_steps(run) == [1]

    r = run_train(dde_train, "tiny_dde.yaml", sets + ["train.max_steps=2", "optim.lr=1e-4", "train.micro_batch=1"],
                  resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: optim.lr changed since the checkpoint: 3e-04 -> 1e-04" in r.stderr, r.stderr[-3000:]
    assert "resume: train.micro_batch changed since the checkpoint: 2 -> 1" in r.stderr
    assert "resume: train.max_steps changed since the checkpoint: 1 -> 2" in r.stderr


@pytest.mark.parametrize("damage", ["truncated", "1e400", "fraction"])
def test_damaged_trainer_state_is_an_error_naming_the_file(dde_train, fixtures, tmp_path, damage):
    run = tmp_path / damage
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=1", "checkpoint.every=1",
                                                    "logging.per_sample=false"]
    assert run_train(dde_train, "tiny_dde.yaml", sets).returncode == 0
    state = checkpoint_dir(run, 1) / "trainer_state.json"
    text = state.read_text()
    damaged = {"truncated": text[: len(text) // 2], "1e400": text.replace('"step": 1', '"step": 1e400'),
               "fraction": text.replace('"step": 1', '"step": 1.5')}[damage]
    assert damaged != text
    state.write_text(damaged)
    r = run_train(dde_train, "tiny_dde.yaml", sets + ["train.max_steps=2"], resume=True)
    assert r.returncode == 1, r.stderr[-3000:]
    assert str(state) in r.stderr and "damaged checkpoint file" in r.stderr, r.stderr[-3000:]
    assert "unexpected error" not in r.stderr


def test_a_second_ctrl_c_kills_at_once(dde_train, fixtures, tmp_path):
    run = tmp_path / "twice"
    sets = tiny_overrides(fixtures, "sd15", run) + MANY_MICRO
    env = dict(os.environ, DDE_DEBUG_MICRO_BATCH_SLEEP_MS="250")
    proc = subprocess.Popen(train_command(dde_train, "tiny_dde.yaml", sets), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the log reaches stderr line by line
        if "training steps" in line:
            break
    assert proc.poll() is None, "dde_train exited before training"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT
    assert complete_steps(run) == []
