"""docs/method.md section 7 through the real dde_train, checked against an independent numpy
replay of the note: the calibrated temperature (with a window), the debiased correction over a
20-step run, the control uniform_ct, and the per-t-bin figures of step and eval records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import read_records, run_train, tiny_overrides
from dde_reference import correction_of, schedule

TABLES = schedule()
BETA = 5000.0


def delta_of(rec: dict) -> float:
    return (rec["mse_policy_w"] - rec["mse_ref_w"]) - (rec["mse_policy_l"] - rec["mse_ref_l"])


def train(dde_train, fixtures, out, *sets, held_out=False):
    args = tiny_overrides(fixtures, "sd15", out, held_out=held_out) + [
        "optim.warmup_steps=0", "logging.per_sample=true", "checkpoint.every=100", *sets]
    r = run_train(dde_train, "tiny_dde.yaml", args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def replay_debiased(records: list[dict], T: int, mu: float) -> dict[int, np.ndarray]:
    """E-hat as each step read it (after the previous step's update), section 7.2."""
    E = np.zeros(T)
    n = np.zeros(T, dtype=np.int64)
    seen_by_step = {}
    by_step: dict[int, list[dict]] = {}
    for rec in records:
        by_step.setdefault(rec["step"], []).append(rec)
    for step in sorted(by_step):
        debiased = np.where(n > 0, E / (1.0 - mu ** np.maximum(n, 1)), 0.0)
        seen_by_step[step] = debiased
        sums, counts = np.zeros(T), np.zeros(T)
        for rec in by_step[step]:
            sums[rec["t"]] += -0.5 * TABLES["lambda"][rec["t"]] * delta_of(rec)
            counts[rec["t"]] += 1
        seen = counts > 0
        E[seen] = mu * E[seen] + (1 - mu) * sums[seen] / counts[seen]
        n[seen] += 1
    return seen_by_step


@pytest.mark.parametrize("method", ["dde_single", "dde"])
def test_calibrated_temperature_with_a_window(dde_train, fixtures, tmp_path, method):
    out = tmp_path / method
    r = train(dde_train, fixtures, out, f"method.name={method}", "method.temperature=calibrated",
              "method.t_lo=200", "method.t_hi=700", "train.max_steps=3")
    G = math.exp(np.log(TABLES["c"][200:700]).mean())
    assert abs(G - 1.890212) < 1e-6
    beta = BETA / G
    assert f"{beta:.6g}" in r.stderr  # logged at start-up
    pairs = read_records(out, "pair")
    assert pairs and all(200 <= p["t"] < 700 for p in pairs)
    for p in pairs:
        z = -0.5 * beta * TABLES["c"][p["t"]] * delta_of(p)
        if method == "dde":
            z += beta * p["correction"]
        assert p["z"] == pytest.approx(z, rel=1e-6, abs=1e-9), p


def test_a_calibrated_temperature_is_refused_for_methods_without_c_t(dde_train, fixtures, tmp_path):
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", tmp_path / "x") +
                  ["method.name=uniform", "method.temperature=calibrated"])
    assert r.returncode != 0
    assert "method.temperature" in r.stderr and "uniform" in r.stderr


def test_debiased_correction_over_twenty_steps_and_resume(dde_train, fixtures, tmp_path):
    out = tmp_path / "debias"
    train(dde_train, fixtures, out, "method.name=dde", "method.ema_debias=true", "train.max_steps=20")
    pairs = read_records(out, "pair")
    debiased = replay_debiased(pairs, 1000, 0.9)
    nonzero = 0
    for p in pairs:
        expected = correction_of(debiased[p["step"]], p["t"])
        assert p["correction"] == pytest.approx(expected, rel=1e-9, abs=1e-15), p
        z = -0.5 * BETA * TABLES["c"][p["t"]] * delta_of(p) + BETA * expected
        assert p["z"] == pytest.approx(z, rel=1e-6, abs=1e-9)
        nonzero += expected != 0
    assert nonzero > 10  # the correction is exercised, not all zero


def test_debiased_counts_are_checkpointed_and_resume_is_exact(dde_train, fixtures, tmp_path):
    from safetensors.numpy import load_file

    sets = ["method.name=dde", "method.ema_debias=true", "checkpoint.every=2", "logging.per_sample=false"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(dde_train, fixtures, straight, *sets, "train.max_steps=4")
    train(dde_train, fixtures, halves, *sets, "train.max_steps=2")
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", halves) +
                  ["optim.warmup_steps=0", "checkpoint.every=2", *sets, "train.max_steps=4"], resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(straight / "checkpoints" / "step-00000004" / "training_state.safetensors"))
    b = load_file(str(halves / "checkpoints" / "step-00000004" / "training_state.safetensors"))
    assert a["correction.n"].dtype == np.int64 and a["correction.n"].sum() > 0
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_uniform_ct_draws_t_by_c_t_and_scores_as_uniform(dde_train, fixtures, tmp_path):
    out = tmp_path / "uct"
    train(dde_train, fixtures, out, "method.name=uniform_ct", "train.max_steps=20")
    pairs = read_records(out, "pair")
    ts = np.array([p["t"] for p in pairs])
    p_t = TABLES["c"] / TABLES["c"].sum()
    assert ts.mean() > 700 and ts.mean() == pytest.approx(float((np.arange(1000) * p_t).sum()), abs=60)
    for p in pairs:
        assert p["z"] == pytest.approx(-0.5 * BETA * delta_of(p), rel=1e-6, abs=1e-9)
        assert p["credit"] == pytest.approx(1 / (1 + math.exp(p["z"])), rel=1e-9)


def test_t_bin_figures_match_the_pair_records(dde_train, fixtures, tmp_path):
    out = tmp_path / "bins"
    train(dde_train, fixtures, out, "method.name=dde", "train.max_steps=4", "eval.every=2",
          "eval.t_bins=[100,500,900]", held_out=True)
    pairs = read_records(out, "pair")
    for step in read_records(out, "step"):
        mine = [p for p in pairs if p["step"] == step["step"]]
        bins = step["t_bins"]
        assert sum(bins["pairs"]) == len(mine) == 4
        for b in range(10):
            inside = [p for p in mine if p["t"] * 10 // 1000 == b]
            assert bins["pairs"][b] == len(inside)
            if not inside:
                assert bins["misranked"][b] is None and bins["credit"][b] is None
                continue
            assert bins["misranked"][b] == pytest.approx(np.mean([delta_of(p) > 0 for p in inside]))
            assert bins["credit"][b] == pytest.approx(np.mean([p["credit"] for p in inside]), rel=1e-9)
            assert bins["z"][b] == pytest.approx(np.mean([p["z"] for p in inside]), rel=1e-9, abs=1e-12)
    for ev in read_records(out, "eval"):
        assert len(ev["misranked_by_t"]) == len(ev["credit_by_t"]) == len(ev["z_by_t"]) == 3
        for acc, mis in zip(ev["implicit_acc_by_t"], ev["misranked_by_t"]):
            assert 0 <= mis <= 1 and acc + mis <= 1 + 1e-12
