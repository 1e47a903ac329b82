"""python -m dde_tools.plot_run on a real run directory: four valid PNG figures, and the credit
figure's binned means are those of the per-pair records in metrics.jsonl; binned_mean on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, read_metrics, read_records, run_train, tiny_overrides
from dde_tools import plot_run

STEPS = 6
BATCH = 4  # configs/tiny_dde.yaml


def run_plot_run(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    return subprocess.run([sys.executable, "-m", "dde_tools.plot_run", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(dde_train, fixtures, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plot_run") / "run"
    sets = tiny_overrides(fixtures, "sd15", out, held_out=True) + [
        "method.name=dde", f"train.max_steps={STEPS}", "checkpoint.every=3", "logging.per_sample=true"]
    result = run_train(dde_train, "tiny_dde.yaml", sets)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_cli_writes_five_valid_pngs(run_dir):
    result = run_plot_run(run_dir)
    assert result.returncode == 0, result.stderr
    figures = run_dir / "figures"
    want = {"training.png": (1000, 350), "t_bins.png": (1000, 350), "correction.png": (500, 350),
            "credit.png": (500, 350), "eval.png": (1000, 350)}
    assert result.stdout.split() == [str(figures / name) for name in want]
    for name, size in want.items():
        path = figures / name
        assert path.stat().st_size > 10_000, f"{name}: only {path.stat().st_size} bytes"
        with Image.open(path) as image:
            image.verify()  # a truncated or corrupt PNG raises here
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == size, (name, image.format, image.size)
            colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50, f"{name}: {len(colors or [])} colours: an empty figure?"


def test_credit_bins_are_the_means_of_the_pair_records(run_dir, tmp_path, monkeypatch):
    seen = []

    def spy(t, values, num_timesteps, bins):
        result = binned_mean(t, values, num_timesteps, bins)
        seen.append((num_timesteps, bins, result))
        return result

    binned_mean = plot_run.binned_mean
    monkeypatch.setattr(plot_run, "binned_mean", spy)
    bins = 10
    plot_run.plot_run(run_dir, tmp_path / "figures", bins=bins)
    assert len(seen) == 1
    num_timesteps, used_bins, (centers, means) = seen[0]
    assert (num_timesteps, used_bins) == (1000, bins)

    # Straight from metrics.jsonl: every pair record, bin b holds t in [100 b, 100 b + 100).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = [r for r in records if r["kind"] == "pair"]
    assert len(pairs) == STEPS * BATCH
    t = np.array([p["t"] for p in pairs])
    credit = np.array([p["credit"] for p in pairs], dtype=np.float64)
    want = np.full(bins, np.nan)
    for b in range(bins):
        inside = (t // 100) == b
        if inside.any():
            want[b] = credit[inside].mean()
    assert np.count_nonzero(~np.isnan(want)) >= 3  # the comparison covers several bins
    np.testing.assert_allclose(means, want, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(centers, np.arange(bins) * 100 + 50)


def test_training_and_correction_come_from_the_run(run_dir):
    steps, pairs = plot_run.read_metrics(run_dir)
    assert (steps, pairs) == read_metrics(run_dir)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [e["step"] for e in plot_run.read_records(run_dir)["eval"]] == [0, STEPS]  # first and last
    correction = plot_run.latest_correction(run_dir)
    assert correction is not None and correction["step"] == STEPS  # the newest of step 3 and step 6
    saved = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "correction_ema.json").read_text())
    assert correction["E"] == saved["E"]


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path, kind):
    target = tmp_path / ("not_a_run" if kind == "empty" else "nowhere")
    if kind == "empty":
        target.mkdir()
    result = run_plot_run(target)
    assert result.returncode == 1
    assert f"{target / 'metrics.jsonl'} not found" in result.stderr
    assert "dde_train run directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (target / "figures").exists()
    with pytest.raises(SystemExit, match="not found: is .* a dde_train run directory"):
        plot_run.plot_run(target, tmp_path / "figs")


def test_binned_mean_on_hand_values() -> None:
    # T = 100, 4 bins of width 25: [0, 25), [25, 50), [50, 75), [75, 100).
    t = np.array([0, 24, 25, 49, 99, 75], dtype=np.float64)
    values = np.array([1.0, 3.0, 10.0, 20.0, 7.0, 5.0])
    centers, means = plot_run.binned_mean(t, values, num_timesteps=100, bins=4)
    np.testing.assert_array_equal(centers, [12.5, 37.5, 62.5, 87.5])
    np.testing.assert_array_equal(means[[0, 1, 3]], [2.0, 15.0, 6.0])
    assert np.isnan(means[2])  # an empty bin is NaN, not 0


def test_binned_mean_matches_a_direct_loop() -> None:
    rng = np.random.default_rng(0)
    for num_timesteps, bins in ((1000, 20), (1000, 7), (50, 50)):
        t = rng.integers(0, num_timesteps, size=300).astype(np.float64)
        values = rng.normal(size=300)
        centers, means = plot_run.binned_mean(t, values, num_timesteps, bins)
        width = num_timesteps / bins
        for b in range(bins):
            lo, hi = b * width, (b + 1) * width
            assert centers[b] == pytest.approx((lo + hi) / 2, rel=1e-12)
            inside = values[(t >= lo) & (t < hi)]
            if inside.size:
                assert means[b] == pytest.approx(inside.mean(), rel=1e-12, abs=1e-12)
            else:
                assert np.isnan(means[b])


def test_binned_mean_puts_t_equal_to_T_into_the_last_bin() -> None:
    _, means = plot_run.binned_mean(np.array([1000.0]), np.array([4.0]), num_timesteps=1000, bins=10)
    assert means[-1] == 4.0 and np.isnan(means[:-1]).all()


def test_t_bins_windows_pool_steps_until_cells_hold_pairs(run_dir):
    """t_bins.png pools the step records into windows: at 4 pairs a step over 10 bins a one-step
    cell holds 0.4 pairs on average. The windows cover every step once; each cell's pair count is
    the sum of its steps'; its credit is the pair-weighted mean of theirs (recomputed here from the
    step records); an average cell holds at least the minimum."""
    steps = read_records(run_dir, "step")
    pooled = plot_run.t_bin_windows(steps, min_pairs=2)
    per_cell = BATCH / 10
    assert pooled["window"] == int(np.ceil(2 / per_cell)) == 5
    assert pooled["first_step"] == [steps[0]["step"], steps[5]["step"]]
    assert pooled["last_step"] == [steps[4]["step"], steps[-1]["step"]]
    first = steps[:5]
    pairs = np.asarray([r["t_bins"]["pairs"] for r in first])
    assert pooled["pairs"][0] == pairs.sum(axis=0).tolist()
    assert sum(pooled["pairs"][0]) == 5 * BATCH
    for b in range(10):
        weighted = [(r["t_bins"]["credit"][b], r["t_bins"]["pairs"][b]) for r in first if r["t_bins"]["pairs"][b]]
        if weighted:
            want = sum(c * n for c, n in weighted) / sum(n for _, n in weighted)
            assert pooled["credit"][0][b] == pytest.approx(want, rel=1e-12)
        else:
            assert pooled["credit"][0][b] is None


def test_t_bins_windows_by_hand():
    def record(step, pairs, credit, misranked):
        return {"kind": "step", "step": step, "t_bins": {"pairs": pairs, "credit": credit, "misranked": misranked}}

    steps = [record(1, [2, 0], [0.5, None], [1.0, None]), record(2, [1, 1], [0.2, 0.9], [0.0, None]),
             record(3, [0, 2], [None, 0.4], [None, 0.5])]
    pooled = plot_run.t_bin_windows(steps, min_pairs=2)  # 2 pairs a step over 2 bins: 1 a cell -> windows of 2
    assert pooled["window"] == 2 and pooled["first_step"] == [1, 3] and pooled["last_step"] == [2, 3]
    assert pooled["pairs"] == [[3, 1], [0, 2]]
    assert pooled["credit"][0] == pytest.approx([(2 * 0.5 + 0.2) / 3, 0.9])
    assert pooled["misranked"][0] == [pytest.approx(2 / 3), None]
    assert pooled["credit"][1] == [None, pytest.approx(0.4)]
    assert plot_run.t_bin_windows([{"kind": "step", "step": 1}])["window"] == 0
