"""dist.force_process_group: a real process group (Gloo here, NCCL on a GPU) at world size 1, so one
machine runs the collective code path of a multi-GPU job. With one rank every all-reduce is the
identity, so the run must match a run without a process group exactly."""

from __future__ import annotations

from conftest import read_metrics, run_train, tiny_overrides

STEPS = ["train.max_steps=2", "checkpoint.every=2", "logging.per_sample=true"]


def test_world_of_one_with_a_process_group_trains_as_without(dde_train, fixtures, tmp_path):
    plain, forced = tmp_path / "plain", tmp_path / "forced"
    env = {"OMP_NUM_THREADS": "1"}
    r_plain = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", plain) + STEPS, env=env)
    assert r_plain.returncode == 0, r_plain.stderr
    r = run_train(dde_train, "tiny_dde.yaml",
                  tiny_overrides(fixtures, "sd15", forced) + STEPS + ["dist.force_process_group=true"], env=env)
    assert r.returncode == 0, r.stderr
    # the process group starts before train.log is opened: its line is on the terminal
    assert "backend gloo on cpu" in r.stderr + r.stdout
    assert "backend gloo" not in r_plain.stderr + r_plain.stdout
    steps_plain, pairs_plain = read_metrics(plain)
    steps_forced, pairs_forced = read_metrics(forced)
    for a, b in zip(steps_plain, steps_forced, strict=True):
        assert (a["loss"], a["grad_norm"], a["implicit_acc"]) == (b["loss"], b["grad_norm"], b["implicit_acc"])
    # per-pair rows went through all_gather on the process group: same rows, same order
    keys = ("pair_id", "t", "mse_policy_w", "z", "correction")
    assert [tuple(p[k] for k in keys) for p in pairs_plain] == [tuple(p[k] for k in keys) for p in pairs_forced]
