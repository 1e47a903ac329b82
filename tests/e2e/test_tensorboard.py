"""logging.tensorboard: the trainer's event files, read back by the tensorboard package's own
reader (what `tensorboard --logdir` uses), hold the loss curve and the held-out accuracy."""

from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import read_records, run_train, tiny_overrides


def test_tensorboard_reads_the_loss_curve_and_the_evaluation(dde_train, fixtures, tmp_path):
    out = tmp_path / "tb"
    sets = tiny_overrides(fixtures, "sd15", out, held_out=True) + [
        "logging.tensorboard=true", "train.max_steps=4", "eval.every=2", "eval.t_bins=[100,500]",
        "logging.per_sample=false", "checkpoint.every=100"]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/implicit_acc", "eval/implicit_acc_t100"):
        assert tag in tags, tags
    loss = events.Scalars("train/loss")
    steps = read_records(out, "step")
    assert [e.step for e in loss] == [s["step"] for s in steps]
    for e, s in zip(loss, steps):
        assert math.isclose(e.value, s["loss"], rel_tol=1e-6)  # float32 in the event
    assert [e.step for e in events.Scalars("eval/implicit_acc")] == [0, 2, 4]
    # The values are the evaluation's (float32 in the event: 2^-24 relative, so rel 1e-6), overall
    # and per t bin, and they moved (step 0 scores 0: Delta = 0 before training).
    evals = {e["step"]: e for e in read_records(out, "eval")}
    float32 = lambda got, want: math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12)  # noqa: E731
    for tag, key, index in (("eval/implicit_acc", "implicit_acc", None), ("eval/loss", "loss", None),
                            ("eval/implicit_acc_t100", "implicit_acc_by_t", 0),
                            ("eval/implicit_acc_t500", "implicit_acc_by_t", 1)):
        assert tag in tags, tags
        for e in events.Scalars(tag):
            want = evals[e.step][key] if index is None else evals[e.step][key][index]
            assert float32(e.value, want), (tag, e.step, e.value, want)
    assert evals[0]["implicit_acc"] == 0.0 and evals[4]["implicit_acc"] > 0.0
