"""The latent cache (docs/formats.md section 6): dde_encode_cache encodes the tiny shards once, and
a run with data.cache must compute the same first step as a run from the images at the same seed
(same pairs, t, flips, caption dropout, posterior noise): the four per-pair errors agree within a
relative 1e-5. Also: random_crop with a cache and a stale cache are errors that say so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, build_dir, read_metrics, run_train, tiny_overrides

CONFIGS = {"sd15": "tiny_dde.yaml", "sdxl": "tiny_sdxl_dde.yaml"}
ONE_STEP = [
    "train.max_steps=1", "checkpoint.every=1", "optim.warmup_steps=0", "method.name=dde",
    "data.caption_dropout=0.5", "logging.per_sample=true", "run.seed=7",
]
ERRORS = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")


def encode_cache(family: str, sets: list[str], out: Path) -> subprocess.CompletedProcess:
    binary = build_dir() / "dde_encode_cache"
    if not binary.is_file():
        pytest.fail(f"{binary} not built: run scripts/build.sh (or set DDE_BUILD_DIR)")
    cmd = [str(binary), "--config", str(ROOT / "configs" / CONFIGS[family]), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def build_cache(fixtures: Path, family: str, tmp_path: Path) -> Path:
    cache = tmp_path / f"{family}_cache"
    r = encode_cache(family, tiny_overrides(fixtures, family, tmp_path / "unused"), cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return cache / "index.json"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_first_step_from_the_cache_equals_the_one_from_images(dde_train, fixtures, tmp_path, family):
    cache = build_cache(fixtures, family, tmp_path)
    runs = {}
    for name, extra in (("images", []), ("cache", [f"data.cache={cache}"])):
        out = tmp_path / name
        r = run_train(dde_train, CONFIGS[family], tiny_overrides(fixtures, family, out) + ONE_STEP + extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = read_metrics(out)[1]
    assert "latent cache" in (tmp_path / "cache" / "train.log").read_text()
    images, cached = runs["images"], runs["cache"]
    assert len(images) == len(cached) == 4
    worst = 0.0
    for a, b in zip(images, cached):
        assert (a["pair_id"], a["t"]) == (b["pair_id"], b["t"])
        for key in ERRORS:
            rel = abs(a[key] - b[key]) / abs(a[key])
            worst = max(worst, rel)
            assert rel <= 1e-5, (key, a, b)
    print(f"[ latent cache ] {family}: max relative difference of the per-pair errors {worst:.3e}")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bytes_per_pair_matches_the_files(fixtures, tmp_path, family):
    index = json.loads(build_cache(fixtures, family, tmp_path).read_text())
    for shard in index["shards"]:
        path = tmp_path / f"{family}_cache" / shard["file"]
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size - header == shard["pairs"] * index["bytes_per_pair"]
    s = index["shape"]
    floats = 8 * s["latent_channels"] * s["latent_size"] ** 2 + s["text_length"] * s["text_dim"] + s["pooled_dim"]
    assert index["bytes_per_pair"] == 4 * floats + 8 * 8 + 1  # fp32, geometry int64 [2, 4], ok u8
    print(f"[ latent cache ] {family}: {index['bytes_per_pair']} bytes per pair at {index['resolution']} px")


def test_random_crop_with_a_cache_is_an_error_naming_the_key(dde_train, fixtures, tmp_path):
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "run") + ONE_STEP + [
        f"data.cache={tmp_path / 'any' / 'index.json'}", "data.random_crop=true"]
    r = run_train(dde_train, CONFIGS["sd15"], sets)
    assert r.returncode != 0
    assert "data.random_crop" in r.stderr and "data.cache" in r.stderr, r.stderr[-2000:]


def test_a_stale_cache_is_an_error(dde_train, fixtures, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(fixtures / "shards" / "sd15", shards)
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "run") + [f"data.index={shards / 'index.json'}"]
    cache = tmp_path / "cache"
    assert encode_cache("sd15", sets, cache).returncode == 0
    # A re-export changes a shard (here only its recorded hash): the cache no longer fits it.
    index = json.loads((shards / "index.json").read_text())
    index["shards"][0]["sha256"] = "0" * 64
    (shards / "index.json").write_text(json.dumps(index))
    r = run_train(dde_train, CONFIGS["sd15"], sets + ONE_STEP + [f"data.cache={cache / 'index.json'}"])
    assert r.returncode != 0
    assert "cache is stale" in r.stderr and "rebuild the cache" in r.stderr, r.stderr[-2000:]
    # The same folder is not overwritten by a second encode.
    again = encode_cache("sd15", sets, cache)
    assert again.returncode != 0 and "cache folder exists" in again.stderr
