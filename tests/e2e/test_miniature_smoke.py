"""The miniature world's smoke version: every stage of experiments/miniature/run.py at tiny sizes
(a few minutes on a CPU) through the real dde_train binary, export and evaluation path.

The full experiment (docs/miniature.md) is not part of the test command; this is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import ROOT
from miniature import world
from miniature.annotator import WorldAnnotator
from miniature.run import SMOKE, variants


def test_annotator_prefers_the_described_image() -> None:
    """Originals score near 1 for their caption, lower for a one-attribute change, lower still for
    another scene's caption."""
    rng = np.random.default_rng(7)
    annotator = WorldAnnotator()
    scenes = [world.sample_scene(rng) for _ in range(50)]
    images = [world.render(s) for s in scenes]
    own = annotator.score(images, [world.caption(s) for s in scenes])
    changed = annotator.score(images, [world.caption(world.corrupt(s, rng)) for s in scenes])
    other = annotator.score(images, [world.caption(world.sample_scene(rng)) for _ in scenes])
    assert own.min() > 0.9
    assert (own > changed).all()
    assert own.mean() - other.mean() > 0.4


def test_smoke_run_yields_every_row(dde_train: Path, fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "miniature"
    result = subprocess.run(
        [sys.executable, "-m", "miniature.run", "--smoke", "--out", str(out), "--bin", str(dde_train)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT / 'experiments'}", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == set(variants(SMOKE))
    for name, entry in results["variants"].items():
        for key in ("mean", "delta", "win_rate", *[f"{k}_ci95" for k in ("delta", "win")]):
            values = entry[key] if isinstance(entry[key], list) else [entry[key]]
            assert all(math.isfinite(v) for v in values), (name, key, entry[key])
        assert entry["delta_ci95"][0] <= entry["delta"] <= entry["delta_ci95"][1]
    table = (out / "results.md").read_text()
    for method in ("uniform", "discounted", "dde", "dde_single", "dde_step", "sft"):
        assert f"| {method} |" in table
    vae = json.loads((out / "vae_report.json").read_text())
    assert math.isfinite(vae["reconstruction_mean"]) and 0.9 < vae["original_mean"] <= 1.0
    # the trained runs wrote per-pair records and the correction array the figures read
    pairs = [json.loads(line) for line in (out / "runs" / "dde" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert any(p.get("kind") == "pair" and p.get("credit") is not None for p in pairs)
    for figure in ("credit_methods.png", "correction_methods.png", "credit_windows.png", "samples.png"):
        assert (out / "figures" / figure).stat().st_size > 0
