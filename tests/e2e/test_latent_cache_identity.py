"""A latent cache pinned to its source, and an encoder that owns its output (docs/formats.md
section 6):
- the cache records the sha256 of the VAE encoder and text encoders it was made with, and the
  trainer compares it with the manifest's record by default: latents from another VAE with the same
  file names and sizes are refused, with or without the record (an old manifest is hashed);
- a NaN in the cached empty-caption embedding, shared by every dropped caption, stops the run at
  start naming the file and tensor (not 20 skipped steps later);
- a cache index that is a symbolic-link loop is named as one;
- a second dde_encode_cache on the same --out is refused at once naming the first's pid; an --out
  that is a dangling link, a link loop, or in a missing folder is refused by name; no path ends in a
  bare file-system error."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from conftest import ROOT, build_dir, run_train, tiny_overrides
from test_latent_cache import CONFIGS, ONE_STEP, build_cache, encode_cache

BARE = ("unexpected error", "filesystem error:")


def copy_export(fixtures: Path, tmp_path: Path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(fixtures / "export" / "sd15", export)
    return export


def other_vae_same_size(export: Path) -> None:
    """Another VAE encoder of the same name and size: one byte of the file changed, and the
    manifest's record updated to it, as a re-export of another VAE would write."""
    path = export / "vae_encoder.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["sha256"]["vae_encoder.pt"] = hashlib.sha256(bytes(data)).hexdigest()
    (export / "manifest.json").write_text(json.dumps(manifest))


def train_on_cache(dde_train, fixtures, tmp_path, cache: Path, *sets: str):
    base = tiny_overrides(fixtures, "sd15", tmp_path / "run") + ONE_STEP + [f"data.cache={cache}"]
    return run_train(dde_train, CONFIGS["sd15"], base + list(sets))


def test_the_export_records_every_component_hash(fixtures):
    manifest = json.loads((fixtures / "export" / "sd15" / "manifest.json").read_text())
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((fixtures / "export" / "sd15").glob("*.pt"))}
    assert manifest["sha256"] == want


def test_a_cache_from_another_vae_of_the_same_size_is_refused(dde_train, fixtures, tmp_path):
    cache = build_cache(fixtures, "sd15", tmp_path)
    export = copy_export(fixtures, tmp_path)
    other_vae_same_size(export)
    sets = [f"model.manifest={export / 'manifest.json'}"]
    r = train_on_cache(dde_train, fixtures, tmp_path, cache, *sets)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "cache made with other encoder weights" in r.stderr and "model_files[vae_encoder]" in r.stderr
    assert "sha256" in r.stderr and "rebuild the cache" in r.stderr, r.stderr[-2000:]
    # A manifest from before the record: the files are hashed at start, with the same verdict.
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["sha256"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    r = train_on_cache(dde_train, fixtures, tmp_path, cache, *sets)
    assert r.returncode == 1 and "cache made with other encoder weights" in r.stderr, r.stderr[-2000:]


def test_data_verify_refuses_a_model_file_that_no_longer_matches_its_record(dde_train, fixtures, tmp_path):
    cache = build_cache(fixtures, "sd15", tmp_path)
    export = copy_export(fixtures, tmp_path)
    path = export / "text_encoder.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # changed after export; the manifest still records the old hash
    path.write_bytes(bytes(data))
    r = train_on_cache(dde_train, fixtures, tmp_path, cache, f"model.manifest={export / 'manifest.json'}",
                       "data.verify=true")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "model file changed since export" in r.stderr and "text_encoder.pt" in r.stderr, r.stderr[-2000:]


def test_a_nan_in_the_empty_caption_embedding_stops_the_run_naming_it(dde_train, fixtures, tmp_path):
    index = build_cache(fixtures, "sd15", tmp_path)
    path = index.parent / "empty_caption.safetensors"
    tensors = load_file(str(path))
    tensors["text"][3, 5] = np.nan
    save_file(tensors, str(path))
    r = train_on_cache(dde_train, fixtures, tmp_path, index)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "non-finite values in the cached empty-caption embedding" in r.stderr, r.stderr[-2000:]
    assert f"{path}: text" in r.stderr and "1 of" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not [
        line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]


def test_a_cache_index_that_is_a_link_loop_is_named(dde_train, fixtures, tmp_path):
    loop = tmp_path / "loop.json"
    os.symlink(loop, loop)
    r = train_on_cache(dde_train, fixtures, tmp_path, loop)
    assert r.returncode == 1
    assert "symbolic link loop" in r.stderr and "data.cache" in r.stderr, r.stderr[-2000:]
    assert not any(b in r.stderr for b in BARE)


def test_a_locked_output_is_refused_at_once_naming_the_holder(fixtures, tmp_path):
    out = tmp_path / "cache"
    with open(tmp_path / "cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        r = encode_cache("sd15", tiny_overrides(fixtures, "sd15", tmp_path / "unused"), out)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "another process is writing this output" in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "cache.staging").exists()


def test_two_encoders_on_one_output_one_wins_the_other_is_refused_by_name(fixtures, tmp_path):
    out = tmp_path / "cache"
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused")
    cmd = [str(build_dir() / "dde_encode_cache"), "--config", str(ROOT / "configs" / CONFIGS["sd15"]),
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another process is writing this output" in loser or "cache folder exists" in loser, loser[-2000:]
    assert not any(b in loser for b in BARE), loser[-2000:]
    assert (out / "index.json").is_file() and not (tmp_path / "cache.lock").exists()


def test_bad_output_paths_are_named(fixtures, tmp_path):
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    cases = {loop: "a symbolic link loop", dangling: "a dangling symbolic link",
             tmp_path / "missing" / "cache": "the output's folder does not exist"}
    for out, said in cases.items():
        started = time.monotonic()
        r = encode_cache("sd15", sets, out)
        assert r.returncode == 1, (out, r.stderr[-2000:])
        assert said in r.stderr and str(out) in r.stderr, (out, r.stderr[-2000:])
        assert not any(b in r.stderr for b in BARE), r.stderr[-2000:]
        assert time.monotonic() - started < 60
