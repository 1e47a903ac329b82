"""The miniature world v3: its annotators, its statistics, and `bash experiments/miniature/run.sh
--smoke`, every stage at tiny sizes through the real pretraining, export, dde_train and evaluation
path (docs/miniature.md). The full experiment is not part of the test command; this is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from miniature import report, world
from miniature.annotator import ContentAnnotator, WorldAnnotator, content_score
from miniature.run import CONTRASTS, SMOKE, VARIANTS, chosen_settings, grid, run_dir, setting_key, steps_for


def _scenes(count: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(count)]


def test_annotator_prefers_the_described_image() -> None:
    """Originals score near 1 for their caption, lower for a one-attribute change, lower still for
    another scene's caption (both annotators)."""
    rng = np.random.default_rng(7)
    scenes = _scenes(50, 8)
    images = [world.render(s) for s in scenes]
    for annotator in (WorldAnnotator(), ContentAnnotator()):
        own = annotator.score(images, [world.caption(s) for s in scenes])
        changed = annotator.score(images, [world.caption(world.corrupt(s, rng)) for s in scenes])
        other = annotator.score(images, [world.caption(world.sample_scene(rng)) for _ in scenes])
        assert own.min() > 0.9, annotator.name
        assert (own > changed).all(), annotator.name
        assert own.mean() - other.mean() > 0.4, annotator.name


def test_content_annotator_pays_nothing_for_blank_space() -> None:
    """An empty image scores 0 (the world annotator pays it for every unnamed quadrant); leaving a
    named object out costs its share; drawing in an unnamed quadrant costs up to 1 / named."""
    scene = (world.WorldObject("red", "square", 0), world.WorldObject("blue", "circle", 3))
    text = world.caption(scene)
    empty = world.render(())
    assert content_score(empty, text) == 0.0
    assert WorldAnnotator().score([empty], [text])[0] == pytest.approx(0.5)
    full = content_score(world.render(scene), text)
    half = content_score(world.render(scene[:1]), text)
    assert full > 0.9 and half == pytest.approx(full / 2, abs=0.02)
    cluttered = content_score(world.render((*scene, world.WorldObject("green", "square", 1))), text)
    assert full - 0.5 - 0.01 <= cluttered < full - 0.4  # the stray square covers > MIN_AREA pixels
    with pytest.raises(ValueError, match="names no object"):
        content_score(empty, "nothing at all")


def test_paired_difference_pairs_by_seed_and_resamples_seeds_and_prompts() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(size=(5, 40, 2))
    a = b + 0.3 + 0.01 * rng.normal(size=b.shape)  # a shared per-seed/prompt level cancels in a - b
    entry = report.paired_difference(a, b)
    assert entry["delta"] == pytest.approx(0.3, abs=0.01)
    assert entry["ci95"][0] < 0.3 < entry["ci95"][1] and entry["ci95"][1] - entry["ci95"][0] < 0.02
    assert entry["seeds"] == 5 and len(entry["per_seed"]) == 5
    unpaired = report.paired_difference(a, b[::-1])  # the wrong pairing loses the cancellation
    assert unpaired["ci95"][1] - unpaired["ci95"][0] > 0.1


def test_held_out_summary_averages_the_last_evaluations() -> None:
    evals = [{"step": 9, "t_bins": [100, 900], "implicit_acc": 0.6, "misranked_by_t": [0.2, None]},
             {"step": 9, "t_bins": [100, 900], "implicit_acc": 0.8, "misranked_by_t": [0.4, 0.5]}, None]
    summary = report.held_out_summary(evals)
    assert summary["runs"] == 2 and summary["implicit_acc"] == pytest.approx(0.7)
    assert summary["misranked_by_t"] == pytest.approx([0.3, 0.5])
    assert report.held_out_summary([None]) is None


def test_training_ranking_pools_pairs_over_the_last_steps() -> None:
    def record(pairs: list[int], misranked: list[float | None]) -> dict:
        return {"kind": "step", "t_bins": {"pairs": pairs, "misranked": misranked}}

    steps = [record([4, 0], [1.0, None]), record([2, 2], [0.5, 0.0]), record([2, 6], [0.0, 0.5])]
    ranking = report.training_ranking(steps, last=2)  # the first step is left out
    assert ranking["steps"] == 2 and ranking["pairs_by_bin"] == [4, 8]
    assert ranking["misranked_by_bin"] == pytest.approx([0.25, 3 / 8])
    assert ranking["misranked"] == pytest.approx(4 / 12)
    assert report.training_ranking([{"kind": "step"}], last=5) is None


def _smoke(out: Path, dde_train: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "experiments" / "miniature" / "run.sh"), "--smoke", "--out", str(out),
         "--bin", str(dde_train), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_smoke_run_yields_every_table(dde_train: Path, fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "miniature"
    result = _smoke(out, dde_train)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # the sweep: every variant at every (lr, beta, epochs) of the grid (lr only for sft), and the
    # chosen setting is the best validation mean
    assert len(SMOKE.epochs) > 1
    assert {(r["variant"], r["lr"], r["beta"], r["epochs"]) for r in results["sweep"]} == {
        (n, lr, beta, e) for n in SMOKE.sweep for lr, beta in grid(SMOKE, n) for e in SMOKE.epochs}
    assert {r["beta"] for r in results["sweep"] if r["variant"] == "sft"} == {SMOKE.betas[0]}
    chosen = chosen_settings(out, SMOKE)
    assert set(chosen) == set(SMOKE.sweep)
    for name, entry in chosen.items():
        best = max(entry["val_means"], key=entry["val_means"].get)
        assert best == setting_key(entry["lr"], entry["beta"], entry["epochs"]), name
        rows = [r for r in results["sweep"] if r["variant"] == name]
        assert max(r["content"] for r in rows) == entry["val_means"][best]
    # one sweep run per (variant, lr, beta), scored at each length from its own checkpoints: the
    # shorter lengths' checkpoints are the runs of that length (constant lr), kept for the scoring
    for name in SMOKE.sweep:
        for lr, beta in grid(SMOKE, name):
            folder = run_dir(out, SMOKE, name, lr, beta, max(SMOKE.epochs), SMOKE.seeds[0])
            for e in SMOKE.epochs:
                assert (folder / f"val-e{e:g}.json").is_file()
                step = steps_for(out, SMOKE, e)
                assert (folder / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file(), (name, e)
    # a first-seed final run shorter than its sweep run is that run's checkpoint, copied, with the
    # records up to its step (reuse_sweep_checkpoint), not a second training
    for name, entry in chosen.items():
        if entry["epochs"] == max(SMOKE.epochs):
            continue
        step = steps_for(out, SMOKE, entry["epochs"])
        sweep = run_dir(out, SMOKE, name, entry["lr"], entry["beta"], max(SMOKE.epochs), SMOKE.seeds[0])
        final = run_dir(out, SMOKE, name, entry["lr"], entry["beta"], entry["epochs"], SMOKE.seeds[0])
        assert (final / "REUSED_FROM").is_file() and not (final / "stdout.log").exists(), name
        source = sweep / "checkpoints" / f"step-{step:08d}"
        copied = final / "checkpoints" / f"step-{step:08d}"
        for path in source.rglob("*"):
            if path.is_file():
                assert path.read_bytes() == (copied / path.relative_to(source)).read_bytes(), path
        steps = [json.loads(line).get("step", 0) for line in (final / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == step, name
    # every variant at its setting (its own sweep's, or borrowed from the variant it ablates), at
    # every seed for SMOKE.every_seed and the first seed for the others; both annotators, intervals
    # around their estimates, the named score with its interval, the drift and C_t
    assert set(results["variants"]) == set(SMOKE.variants)
    with_correction = {v.name for v in VARIANTS if v.has_correction}
    borrowed = {v.name: v.tuned_from for v in VARIANTS}
    # some variants are not swept: they run at the setting of the variant they borrow from
    assert set(SMOKE.sweep) < set(SMOKE.variants) and borrowed["uniform_ct"] == "uniform"
    for name, entry in results["variants"].items():
        for key in ("content", "world", "named"):
            e = entry[key]
            assert e["seeds"] == (len(SMOKE.seeds) if name in SMOKE.every_seed else 1), name
            values = [e["mean"], e["delta"], e["win_rate"], *e["delta_ci95"], *e["win_ci95"]]
            assert all(math.isfinite(v) for v in values), (name, key, e)
            assert e["delta_ci95"][0] <= e["delta"] <= e["delta_ci95"][1]
        source = chosen[name if name in SMOKE.sweep else borrowed[name]]
        setting = {"lr": source["lr"], "beta": source["beta"], "epochs": source["epochs"]}
        assert results["settings_of"][name] == setting, name
        seeds = SMOKE.seeds if name in SMOKE.every_seed else SMOKE.seeds[:1]
        final = json.loads((run_dir(out, SMOKE, name, *setting.values(), seeds[-1]) / "eval.json").read_text())
        assert final["steps"] == steps_for(out, SMOKE, setting["epochs"]) and "test" in final
        assert len(entry["drift_by_seed"]) == len(seeds) and math.isfinite(entry["drift"])
        for key, source_key in (("delta_content", "content"), ("delta_named", "named")):
            e = entry[source_key]
            assert entry[key] == {"mean": e["delta"], "lo": e["delta_ci95"][0], "hi": e["delta_ci95"][1]}
        if name in with_correction:
            assert len(entry["c_t_final_by_seed"]) == len(seeds) and entry["c_t_final"] >= 0, name
        else:
            assert entry["c_t_final"] is None, name
        held = results["held_out"][name]
        assert len(held["misranked_by_t"]) == len(SMOKE.eval_t_bins) and 0 <= held["implicit_acc"] <= 1
        ranking = results["training_ranking"][name]
        assert len(ranking["misranked_by_bin"]) == 10
        if name == "sft":  # trains without a reference: nothing is ranked during training
            assert ranking["misranked"] is None
        else:
            assert sum(ranking["pairs_by_bin"]) > 0 and 0 <= ranking["misranked"] <= 1
    expected = {f"{a} - {b}" for a, b in CONTRASTS if a in SMOKE.variants and b in SMOKE.variants}
    assert set(results["contrasts"]) == expected and expected
    # the pairs: the best and the worst of K samples, so the mean gap is at least the tie margin
    assert results["pairs"]["pairs"]["prompts"] == SMOKE.pair_prompts
    # the four prompt sets are disjoint
    prompts = json.loads((out / "prompts.json").read_text())
    sets = [set(prompts[k]) for k in ("val", "test", "pairs", "eval_pairs")]
    assert sum(map(len, sets)) == len(set().union(*sets))
    # the samples archive: the base and every seed of every variant, images of the test prompts
    archive = np.load(out / "samples.npz")
    assert archive["images"].dtype == np.uint8
    runs_made = [(n, k) for n in SMOKE.variants for k in (SMOKE.seeds if n in SMOKE.every_seed else SMOKE.seeds[:1])]
    assert archive["images"].shape == (1 + len(runs_made), SMOKE.test_prompts, SMOKE.images_per_prompt, 32, 32, 3)
    assert list(archive["prompts"]) == prompts["test"]
    assert sorted(zip(archive["variant"].tolist(), archive["seed"].tolist())) == sorted([("base", -1)] + runs_made)
    base_image = np.asarray(Image.open(out / "eval" / "test" / "images" / "base" / "00000_00.png").convert("RGB"))
    assert (archive["images"][list(archive["variant"]).index("base"), 0, 0] == base_image).all()
    # the named-quadrant figures, the base's too
    assert 0 <= results["base"]["test"]["named"] <= 1
    table = (out / "results.md").read_text()
    for name in SMOKE.variants:
        assert f"| {name} |" in table
    assert "| dde - uniform |" in table and "misranked" in table
    for figure in ("credit_heatmaps.png", "misranked_by_t.png", "credit_methods.png", "samples.png",
                   "gain_vs_drift.png"):
        assert Image.open(out / "figures" / figure).size[0] > 0
    timings = json.loads((out / "timings.json").read_text())
    assert {"base pretraining and export", "pairs", "preference runs (wall)"} <= set(timings)
    # resumable: a second invocation trains nothing and rewrites the same tables
    again = _smoke(out, dde_train)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trained in" not in again.stdout and "pretrain: step" not in again.stdout
    assert json.loads((out / "results.json").read_text())["variants"] == results["variants"]
