"""The latent cache (docs/formats.md section 6): dde_encode_cache encodes the tiny shards once, and
a run with data.cache must compute the same first step as a run from the images at the same seed
(same pairs, t, flips, caption dropout, posterior noise): the four per-pair errors agree within 10
float32 noise floors (the floor: the run from the images repeated on another CPU kernel set, which
sums in another order; measured in the test). The encoder batches pairs (--batch): any batch size
gives the same cache (within 10 floors: batch 1 encoded again on another kernel set), and a bad pair
inside a batch is left out without moving its neighbours. Also: random_crop with a cache and a
stale cache are errors that say so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, build_dir, other_kernels_env, read_metrics, run_train, tiny_overrides
from test_data_robustness import break_three_pairs, read_records, train

CONFIGS = {"sd15": "tiny_dde.yaml", "sdxl": "tiny_sdxl_dde.yaml"}
ONE_STEP = [
    "train.max_steps=1", "checkpoint.every=1", "optim.warmup_steps=0", "method.name=dde",
    "data.caption_dropout=0.5", "logging.per_sample=true", "run.seed=7",
]
ERRORS = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
FLOORS = 10


def max_rel(a: list[dict], b: list[dict], fields=ERRORS) -> float:
    return max(abs(x[f] - y[f]) / abs(x[f]) for x, y in zip(a, b) for f in fields)


def encode_cache(family: str, sets: list[str], out: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    binary = build_dir() / "dde_encode_cache"
    if not binary.is_file():
        pytest.fail(f"{binary} not built: run scripts/build.sh (or set DDE_BUILD_DIR)")
    cmd = [str(binary), "--config", str(ROOT / "configs" / CONFIGS[family]), "--out", str(out), *flags]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def build_cache(fixtures: Path, family: str, tmp_path: Path) -> Path:
    cache = tmp_path / f"{family}_cache"
    r = encode_cache(family, tiny_overrides(fixtures, family, tmp_path / "unused"), cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return cache / "index.json"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_first_step_from_the_cache_equals_the_one_from_images(dde_train, fixtures, tmp_path, family):
    cache = build_cache(fixtures, family, tmp_path)
    runs = {}
    for name, extra, env in (("images", [], None), ("cache", [f"data.cache={cache}"], None),
                             ("images_other", [], other_kernels_env())):
        out = tmp_path / name
        r = run_train(dde_train, CONFIGS[family], tiny_overrides(fixtures, family, out) + ONE_STEP + extra, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = read_metrics(out)[1]
    assert "latent cache" in (tmp_path / "cache" / "train.log").read_text()
    images, cached = runs["images"], runs["cache"]
    assert len(images) == len(cached) == 4
    for a, b in zip(images, cached):
        assert (a["pair_id"], a["t"]) == (b["pair_id"], b["t"])
    worst, floor = max_rel(images, cached), max_rel(images, runs["images_other"])
    print(f"[ latent cache ] {family}: max relative difference of the per-pair errors {worst:.3e} (floor {floor:.3e})")
    assert 0 < floor and worst <= FLOORS * floor


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


def assert_same_cache(one: Path, two: Path, floor_of: Path) -> float:
    """The same files, rows and integers; floats within FLOORS noise floors of each field (a
    convolution may sum in another order with another batch size or thread count; the floor is
    `floor_of`, the same cache as `one` encoded on another CPU kernel set). Returns the largest float
    difference, relative to the field's largest magnitude."""
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert json.loads((one / "index.json").read_text())["shards"] == json.loads((two / "index.json").read_text())["shards"]
    worst = 0.0
    for path in sorted(one.glob("*.safetensors")):
        a, b, c = load_file(str(path)), load_file(str(two / path.name)), load_file(str(floor_of / path.name))
        assert a.keys() == b.keys(), path.name
        for k in a:
            if a[k].dtype.kind == "f":
                scale = np.abs(a[k]).max() + 1e-30
                diff, floor = np.abs(a[k] - b[k]).max() / scale, np.abs(a[k] - c[k]).max() / scale
                worst = max(worst, float(diff))
                assert diff <= FLOORS * floor, (path.name, k, diff, floor)
            else:
                assert np.array_equal(a[k], b[k]), (path.name, k)
    return worst


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_batch_size_does_not_change_the_cache(fixtures, tmp_path, family):
    sets = tiny_overrides(fixtures, family, tmp_path / "unused")
    caches = {}
    for name, batch, env in (("1", "1", None), ("5", "5", None), ("other", "1", other_kernels_env())):
        # 16 pairs per shard: 5 leaves a ragged last batch
        r = encode_cache(family, sets, tmp_path / f"b{name}", "--batch", batch, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        caches[name] = tmp_path / f"b{name}"
    worst = assert_same_cache(caches["1"], caches["5"], caches["other"])
    print(f"[ latent cache ] {family}: batch 1 against 5, max difference {worst:.3e} of the field's scale")


def test_bad_pairs_inside_a_batch_are_left_out_and_skipped_as_from_the_images(dde_train, fixtures, tmp_path):
    export = break_three_pairs(fixtures, tmp_path)  # pairs 5, 7, 9 of every 16-pair shard
    cache = tmp_path / "cache"
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused") + [f"data.index={export / 'index.json'}"]
    r = encode_cache("sd15", sets, cache, "--batch", "3")  # batches 3-5, 6-8, 9-11 hold them
    assert r.returncode == 0, r.stderr[-3000:]
    broken = 3 * sum(s["pairs"] > 9 for s in json.loads((export / "index.json").read_text())["shards"])
    assert r.stderr.count("cache: bad pair left out") == broken, r.stderr[-3000:]
    assert f"({broken} bad)" in r.stderr

    runs = {}
    for name, extra, env in (("images", [], None), ("cache", [f"data.cache={cache / 'index.json'}"], None),
                             ("images_other", [], other_kernels_env())):
        out = tmp_path / name
        r = train(dde_train, fixtures, export, out, "data.max_bad_pairs=3", "logging.per_sample=true", *extra, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = read_records(out) + (read_metrics(out)[1],)
    (steps_i, bad_i, pairs_i), (steps_c, bad_c, pairs_c) = runs["images"], runs["cache"]
    assert [(b["key"], b["reason"]) for b in bad_c] == [(b["key"], b["reason"]) for b in bad_i]
    assert len(bad_c) == 3
    assert [s["bad_pairs"] for s in steps_c] == [s["bad_pairs"] for s in steps_i] == [0, 3, 3]
    # The frozen reference's errors depend only on the latents, t and the noise, not on how the
    # policy drifted: every pair of every step must match (a row read for its neighbour would not).
    assert [(p["pair_id"], p["t"]) for p in pairs_c] == [(p["pair_id"], p["t"]) for p in pairs_i]
    assert len(pairs_c) == 12
    refs = ("mse_ref_w", "mse_ref_l")
    floor = max_rel(pairs_i, runs["images_other"][2], refs)
    assert 0 < floor and max_rel(pairs_i, pairs_c, refs) <= FLOORS * floor


def test_two_ranks_write_the_cache_one_rank_writes(fixtures, tmp_path):
    from test_multiprocess import free_port

    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused")
    # One thread like each rank below: every shard is then the same computation, bit for bit.
    assert encode_cache("sd15", sets, tmp_path / "one", env={"OMP_NUM_THREADS": "1"}).returncode == 0
    binary = build_dir() / "dde_encode_cache"
    cmd = [str(binary), "--config", str(ROOT / "configs" / CONFIGS["sd15"]), "--out", str(tmp_path / "two")]
    for s in sets:
        cmd += ["--set", s]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       OMP_NUM_THREADS="1"))
             for r in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    shards = json.loads((tmp_path / "one" / "index.json").read_text())["shards"]
    err = results[0][1]  # rank 0 logs what it encodes (the other ranks only warnings and errors)
    assert [f"-> {s['file']}" in err for s in shards] == [i % 2 == 0 for i in range(len(shards))], err
    assert f"{len(shards)} shards, {sum(s['pairs'] for s in shards)} pairs (0 bad)" in err, err  # the total
    assert_same_cache(tmp_path / "one", tmp_path / "two", floor_of=tmp_path / "one")  # floor 0: exact
