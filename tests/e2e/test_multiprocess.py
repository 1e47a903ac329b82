"""Multi-process training on the CPU with Gloo: the same processes torchrun or srun would start,
here launched with torchrun's environment variables (and once through torchrun itself)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, other_kernels_env, read_metrics, run_train, tiny_overrides
from dde_reference import pair_loss, pair_z, replay_correction, schedule

# fp32 summation order differs between 1 rank x 4 pairs and 2 ranks x 2 pairs (all-reduce).
# Adam divides by sqrt(v): for parameters whose gradient is ~0 that rounding noise is amplified
# up to a whole lr-sized step, so the test uses optim.eps = 1 (update ~ lr * gradient) to see
# the gradients' agreement itself. beta = 5000 amplifies forward rounding (batch 4 vs 2 kernels)
# through Delta, a difference of near-equal errors. The bounds are FLOORS times the noise floor of
# the same figure, measured in the test: the one-rank run repeated on another CPU kernel set (each
# sums in its own order; a bound measured on one processor failed on another).
FLOORS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(binary: Path, world: int, sets: list[str], *, resume: bool = False, extra_env: dict | None = None,
           config: str = "tiny_dde.yaml") -> list[subprocess.Popen]:
    """Starts `world` ranks with torchrun's variables; returns the processes."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", **(extra_env or {}))
        cmd = [str(binary), "--config", str(ROOT / "configs" / config)]
        for s in sets:
            cmd += ["--set", s]
        if resume:
            cmd.append("--resume")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def unet(run: Path, step: int) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_two_ranks_match_one_rank_with_twice_the_micro_batch(dde_train, fixtures, tmp_path):
    common = ["train.max_steps=3", "train.global_batch=4", "logging.per_sample=true", "optim.warmup_steps=0",
              "checkpoint.every=100", "optim.eps=1.0", "optim.lr=1e-3"]
    one = tmp_path / "one"
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", one) + common + ["train.micro_batch=4"],
                  env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    results = finish(launch(dde_train, 2, tiny_overrides(fixtures, "sd15", two) + common + ["train.micro_batch=2"]))
    for rc, err in results:
        assert rc == 0, err[-3000:]

    other = tmp_path / "other"
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", other) + common + ["train.micro_batch=4"],
                  env={"OMP_NUM_THREADS": "1", **other_kernels_env()})
    assert r.returncode == 0, r.stderr[-3000:]

    a, b, c = unet(one, 3), unet(two, 3), unet(other, 3)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    floor = max(float(np.abs(a[k] - c[k]).max()) for k in a)
    print(f"max |w(1 rank x 4) - w(2 ranks x 2)| after 3 steps = {worst:.3e} (floor {floor:.3e})")
    assert 0 < floor and worst <= FLOORS * floor
    _, pairs_other = read_metrics(other)
    by_id_other = {(p["step"], p["pair_id"]): p for p in pairs_other}

    steps_1, pairs_1 = read_metrics(one)
    steps_2, pairs_2 = read_metrics(two)
    assert sorted({p["rank"] for p in pairs_2}) == [0, 1]
    by_id_1 = {(p["step"], p["pair_id"]): p for p in pairs_1}
    by_id_2 = {(p["step"], p["pair_id"]): p for p in pairs_2}
    assert by_id_1.keys() == by_id_2.keys()  # the same pairs in the same steps
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-300)  # noqa: E731
    for key, p in by_id_1.items():
        q = by_id_2[key]
        assert p["t"] == q["t"]
        # Step 1 starts from identical weights; later steps from weights a rounding apart, which z
        # (beta * c_t * Delta) magnifies, so from step 2 on only the errors themselves are compared.
        fields = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
        if key[0] == 1:
            fields += ("z", "loss", "correction")
        for field in fields:
            floor = max(rel(by_id_other[k][field], by_id_1[k][field]) for k in by_id_1 if k[0] == key[0])
            assert rel(q[field], p[field]) <= FLOORS * floor + 1e-12, (key, field)
    for field in ("loss", "mse_policy", "mse_ref"):
        for s1, s2, s3 in zip(steps_1, steps_2, read_metrics(other)[0]):
            assert rel(s2[field], s1[field]) <= FLOORS * rel(s3[field], s1[field]) + 1e-12, (s1["step"], field)
    # As in the single-process case: every rank's records follow the method note, and the E in
    # correction_ema.json is the note's update replayed from all ranks' records.
    tables = schedule()
    for q in pairs_2:
        assert q["z"] == pytest.approx(pair_z("dde", q, tables), rel=1e-5, abs=1e-9)
        assert q["loss"] == pytest.approx(pair_loss("dde", q, tables), rel=1e-5, abs=1e-12)
    saved = json.loads((two / "checkpoints/step-00000003/correction_ema.json").read_text())
    np.testing.assert_allclose(saved["E"], replay_correction(pairs_2, tables, 1000, 0.9), rtol=1e-9, atol=1e-300)


def test_torchrun_launches_two_gloo_ranks(dde_train, fixtures, tmp_path):
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    out = tmp_path / "torchrun"
    cmd = [str(torchrun), "--no-python", "--nproc-per-node", "2", "--master-port", str(free_port()), str(dde_train),
           "--config", str(ROOT / "configs" / "tiny_dde.yaml")]
    for s in tiny_overrides(fixtures, "sd15", out) + ["train.max_steps=2"]:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "dist: rank 0/2" in r.stderr
    steps, _ = read_metrics(out)
    assert [s["step"] for s in steps] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "rank-00001.json").is_file()


def wait_for_steps(run: Path, n: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file():
            steps, _ = read_metrics(run, live=True)
            if len(steps) >= n:
                return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.returncode for p in procs]}")
        time.sleep(0.2)
    raise AssertionError(f"{run}: fewer than {n} steps after {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_for_requeue_and_resume_is_exact(dde_train, fixtures, tmp_path, signum):
    common = ["train.max_steps=12", "checkpoint.every=100", "optim.warmup_steps=0"]
    straight = tmp_path / "straight"
    results = finish(launch(dde_train, 2, tiny_overrides(fixtures, "sd15", straight) + common))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:]

    run = tmp_path / "preempted"
    sets = tiny_overrides(fixtures, "sd15", run) + common
    procs = launch(dde_train, 2, sets)
    wait_for_steps(run, 3, procs)
    for p in procs:  # SLURM signals every task of the step
        p.send_signal(signum)
    results = finish(procs)
    assert [rc for rc, _ in results] == [3, 3], results[0][1][-3000:]
    assert "stop requested" in results[0][1]
    saved = sorted((run / "checkpoints").glob("step-*/COMPLETE"))
    assert saved, "no checkpoint written on the signal"
    stopped_at = int(saved[-1].parent.name.split("-")[1])
    assert 3 <= stopped_at < 12

    results = finish(launch(dde_train, 2, sets, resume=True))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:]
    a, b = unet(straight, 12), unet(run, 12)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_a_stop_seen_by_one_rank_mid_step_stops_both_at_the_last_complete_step(dde_train, fixtures, tmp_path):
    # 4 micro-batches per rank and step; only rank 1 raises SIGUSR1, before its micro-batch 1 of
    # step 2. Rank 0 finishes its micro-batches, then both agree before the gradient reduce.
    run = tmp_path / "one_rank"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.global_batch=8", "train.micro_batch=1",
                                                    "train.max_steps=3", "checkpoint.every=100"]
    results = finish(launch(dde_train, 2, sets, extra_env={"DDE_DEBUG_STOP_AT": "2:1:1"}))
    assert [rc for rc, _ in results] == [3, 3], results[0][1][-3000:]
    assert "stop requested (by another rank)" in results[0][1]  # rank 0 was not signalled itself
    assert "stop requested (signal 10)" in results[1][1]
    assert sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/COMPLETE")) == ["step-00000001"]
    for rank in range(2):
        state = json.loads((run / "checkpoints" / "step-00000001" / f"rank-{rank:05d}.json").read_text())
        assert state["loader"]["pairs_consumed"] == 4, state
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == [1]


def test_a_stop_seen_by_one_rank_during_the_evaluation_stops_both(dde_train, fixtures, tmp_path):
    # Rank 1 alone raises SIGUSR1 before batch 3 of its share of step 2's held-out evaluation.
    # Rank 0 evaluates its whole share, then both agree before the results' all-reduce.
    run = tmp_path / "one_rank_eval"
    sets = tiny_overrides(fixtures, "sd15", run, held_out=True) + [
        "train.global_batch=4", "train.micro_batch=2", "train.max_steps=4", "checkpoint.every=100",
        "eval.every=2"]
    results = finish(launch(dde_train, 2, sets, extra_env={"DDE_DEBUG_STOP_IN_EVAL": "2:3:1"}))
    assert [rc for rc, _ in results] == [3, 3], results[0][1][-3000:]
    assert "stop requested (by another rank)" in results[0][1]
    assert "stop requested (signal 10)" in results[1][1]
    for _, err in results:
        assert "eval step 2: stopped by a stop request" in err, err[-3000:]
    assert sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/COMPLETE")) == ["step-00000002"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e.get("kind") == "eval"] == [0]


def test_a_killed_rank_makes_the_survivor_fail_within_the_timeout(dde_train, fixtures, tmp_path):
    run = tmp_path / "killed"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=100000", "dist.timeout_s=20",
                                                     "checkpoint.every=100000"]
    procs = launch(dde_train, 2, sets)
    wait_for_steps(run, 2, procs)
    killed_at = time.time()
    procs[1].kill()
    _, err = procs[0].communicate(timeout=120)
    elapsed = time.time() - killed_at
    print(f"survivor exited {elapsed:.1f} s after the kill (timeout 20 s)")
    assert procs[0].returncode == 1
    assert "collective failed" in err or "rendezvous failed" in err
    assert elapsed < 20 + 15


def test_resume_with_another_world_size_is_refused(dde_train, fixtures, tmp_path):
    run = tmp_path / "ws"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=2"]
    results = finish(launch(dde_train, 2, sets))
    assert all(rc == 0 for rc, _ in results)
    r = run_train(dde_train, "tiny_dde.yaml", sets + ["train.max_steps=4"], resume=True)
    assert r.returncode == 1
    assert "another world size" in r.stderr and "2 ranks" in r.stderr
