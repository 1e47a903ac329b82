"""Tests of dde_tools.pickapic_shards through the exporter: shard sizes and hashes in index.json, the
bounded-memory shuffle, and crash safety of a re-export into a used folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dde_tools import export_pickapic, pickapic_shards, pickapic_shuffle
from dde_tools.common import MARKER

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run(argv: list[str]) -> tuple[int, str, str]:
    """export_pickapic.main in-process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = export_pickapic.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def pairs_in_order(out: Path) -> list[tuple[str, bytes, bytes, bytes]]:
    """(key, meta, jpg_0, jpg_1) of every pair, in shard order."""
    index = json.loads((out / "index.json").read_text())
    pairs = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            members = tar.getmembers()
            for i in range(0, len(members), 3):
                data = [tar.extractfile(m).read() for m in members[i : i + 3]]
                pairs.append((members[i].name.removesuffix(".json"), *data))
    return pairs


def source_rows(pairs: list[tuple]) -> list[int]:
    return [int(json.loads(meta)["source"].split(":")[1]) for _, meta, _, _ in pairs]


def test_index_records_each_shard_size_and_sha256(hostile_parquet, tmp_path: Path) -> None:
    code, _, _ = run(["--parquet", hostile_parquet[0], "--out", tmp_path, "--pairs-per-shard", "100"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert code == 0 and index["version"] == 2 and len(index["shards"]) == 4
    for shard in index["shards"]:
        assert set(shard) == {"file", "pairs", "ties", "bytes", "sha256"}
        assert re.fullmatch(r"shard-\d{6}\.tar", shard["file"])
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) == (tmp_path / shard["file"]).stat().st_size
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])


@pytest.fixture(scope="module")
def orders(hostile_parquet, tmp_path_factory) -> dict[str, Path]:
    """The hostile fixture (340 kept pairs) exported in several orders."""
    variants = {
        "parquet_order": ["--no-shuffle"],
        "seed0": [],
        "seed0_small_buckets": ["--shuffle-memory-mb", "1"],
        "seed0_small_buckets_again": ["--shuffle-memory-mb", "1", "--batch-size", "7"],
        "seed1": ["--shuffle-seed", "1"],
    }
    outs = {}
    for name, extra in variants.items():
        outs[name] = tmp_path_factory.mktemp(name)
        assert run(["--parquet", hostile_parquet[0], "--out", outs[name], "--pairs-per-shard", "64", *extra])[0] == 0
    return outs


def test_no_shuffle_keeps_the_parquet_order(orders) -> None:
    rows = source_rows(pairs_in_order(orders["parquet_order"]))
    assert len(rows) == 340 and rows == sorted(rows)
    assert json.loads((orders["parquet_order"] / "index.json").read_text())["shuffle"] is None


@pytest.mark.parametrize("name", ["seed0", "seed0_small_buckets", "seed1"])
def test_shuffle_is_a_permutation_uncorrelated_with_the_source_order(orders, name: str) -> None:
    reference = pairs_in_order(orders["parquet_order"])
    shuffled = pairs_in_order(orders[name])
    assert [key for key, *_ in shuffled] == [f"{i:09d}" for i in range(340)]
    assert sorted(p[1:] for p in shuffled) == sorted(p[1:] for p in reference)  # same pairs, bytes unchanged
    rows = source_rows(shuffled)
    rho = np.corrcoef(np.argsort(np.argsort(rows)), np.arange(len(rows)))[0, 1]  # Spearman
    assert abs(rho) < 0.2, rho
    # the first 64 pairs (one shard) come from all over the file, not from its first fifth
    assert max(rows[:64]) - min(rows[:64]) > 300


def test_shuffle_depends_on_the_seed_and_buckets_only(orders) -> None:
    def index(name: str) -> dict:
        return json.loads((orders[name] / "index.json").read_text())

    assert index("seed0")["shuffle"] == {"seed": 0, "buckets": 1, "memory_mb": 1024}
    assert index("seed0_small_buckets")["shuffle"]["buckets"] == 3
    orders_seen = {name: source_rows(pairs_in_order(out)) for name, out in orders.items()}
    assert len({tuple(rows) for rows in orders_seen.values()}) == 4  # only the rerun repeats an order
    # same seed and buckets, another --batch-size: byte-identical shards (bucket draw keyed on the row)
    for shard in index("seed0_small_buckets")["shards"]:
        again = orders["seed0_small_buckets_again"] / shard["file"]
        assert again.read_bytes() == (orders["seed0_small_buckets"] / shard["file"]).read_bytes()


@pytest.mark.parametrize("guessed_buckets", [None, 1])
def test_shuffle_memory_is_bounded_by_the_budget(orders, hostile_parquet, tmp_path: Path, monkeypatch,
                                                 guessed_buckets: int | None) -> None:
    """With the footers' estimate (3 buckets of ~460 KB), and with a guess far too low (1 bucket of
    1.4 MB, as dictionary-encoded images give): no bucket loaded is over half the 1 MiB budget."""
    buckets_read, flushes = [], []
    read_records, flush = pickapic_shuffle._read_records, pickapic_shuffle._BucketFiles.flush

    def recording_read(data):
        buckets_read.append(len(data))
        return read_records(data)

    def recording_flush(self):
        flushes.append(self._buffered)
        flush(self)

    monkeypatch.setattr(pickapic_shuffle, "_read_records", recording_read)
    monkeypatch.setattr(pickapic_shuffle._BucketFiles, "flush", recording_flush)
    if guessed_buckets:
        monkeypatch.setattr(export_pickapic, "bucket_count", lambda *args: guessed_buckets)
    assert run(["--parquet", hostile_parquet[0], "--out", tmp_path, "--shuffle-memory-mb", "1"])[0] == 0
    assert sum(buckets_read) > 2**20  # the pairs do not fit in the budget
    assert len(buckets_read) >= 3 and max(buckets_read) <= 2**19  # one bucket in memory at a time
    assert len(flushes) >= 3 and max(flushes) < 2**19 + 300_000  # buffers flushed at 512 KiB (+ one pair)
    reference = pairs_in_order(orders["parquet_order"])
    assert sorted(p[1:] for p in pairs_in_order(tmp_path)) == sorted(p[1:] for p in reference)


def test_shuffle_options_are_checked(tmp_path: Path, fixture_dir: Path) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    code, _, err = run(["--parquet", source, "--out", tmp_path / "a", "--shuffle-seed", "-1"])
    assert code == 2 and "--shuffle-seed is -1, expected an integer >= 0" in err
    code, _, err = run(["--parquet", source, "--out", tmp_path / "b", "--shuffle-memory-mb", "0"])
    assert code == 2 and "--shuffle-memory-mb is 0, expected an integer >= 1" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class Crash(BaseException):
    """An injected crash: not an Exception, so nothing in the exporter handles it."""


def folder_state(out: Path, old_index: str, new_index: str | None) -> str:
    """'old', 'new' or 'none'; fails if index.json describes shards that are not there."""
    if not (out / "index.json").exists():
        return "none"
    text = (out / "index.json").read_text()
    assert text in (old_index, new_index)
    for shard in json.loads(text)["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"]), shard["file"]
    return "old" if text == old_index else "new"


def test_a_crash_at_any_step_leaves_the_old_export_or_no_index(fixture_dir: Path, tmp_path: Path) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    out = tmp_path / "out"
    export_pickapic.export([source], out, pairs_per_shard=5, shuffle_seed=1)
    old_index = (out / "index.json").read_text()
    export_pickapic.export([source], tmp_path / "new", pairs_per_shard=7, shuffle_seed=0)  # what the crashes retry
    new_index = (tmp_path / "new" / "index.json").read_text()
    steps = [(os, "replace"), (Path, "unlink"), (pickapic_shards, "fsync_dir"),
             (pickapic_shards.ShardWriter, "close"), (pickapic_shuffle._BucketFiles, "flush")]
    states = []
    for crash_at in itertools.count(1):
        counter = itertools.count(1)
        with pytest.MonkeyPatch.context() as patch:
            for owner, name in steps:
                original = getattr(owner, name)

                def step(*args, _original=original, **kwargs):
                    if next(counter) == crash_at:
                        raise Crash
                    return _original(*args, **kwargs)

                patch.setattr(owner, name, step)
            try:
                export_pickapic.export([source], out, pairs_per_shard=7, shuffle_seed=0)
            except Crash:
                states.append(folder_state(out, old_index, new_index))
                continue
        break
    assert folder_state(out, old_index, new_index) == "new" and new_index != old_index
    assert states.count("old") >= 10 and states.count("none") >= 10, states  # both sides of the publish
    assert states == sorted(states, key=["old", "none", "new"].index)  # never back to the old index
    shards = len(json.loads(new_index)["shards"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "index.json"] + [f"shard-{i:06d}.tar" for i in range(shards)]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_export_leaves_the_old_export(bad_parquet, fixture_dir: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "out"
    export_pickapic.export([fixture_dir / "pickapic" / "train-00000.parquet"], out, pairs_per_shard=10)
    old_index = (out / "index.json").read_text()
    old_files = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dde_tools.export_pickapic", "--parquet", str(bad_parquet[0]),
                             "--out", str(out), "--shuffle-memory-mb", "1", "--batch-size", "16"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not list(out.glob(".staging-*/buckets/bucket-*")):  # midway through pass 1
            assert proc.poll() is None, "the export ended before it could be interrupted"
            time.sleep(0.005)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signal.SIGTERM)
    leftovers = list(out.glob(".staging-*"))
    assert len(leftovers) == (1 if signum == signal.SIGKILL else 0)  # SIGTERM unwinds and cleans up
    assert folder_state(out, old_index, None) == "old"
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == old_files
    code, _, _ = run(["--parquet", fixture_dir / "pickapic" / "train-00000.parquet", "--out", out])
    assert code == 0 and not list(out.glob(".staging-*"))  # the next export removes the leftover


def test_a_second_export_into_the_same_folder_is_refused(fixture_dir: Path, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running export holds it
        code, _, err = run(["--parquet", fixture_dir / "pickapic" / "train-00000.parquet", "--out", tmp_path])
    finally:
        os.close(fd)
    assert code == 2 and f"{tmp_path}: another export_pickapic is writing into this folder" in err
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(fixture_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    code, _, err = run(["--parquet", fixture_dir / "pickapic" / "train-00000.parquet", "--out", tmp_path / "out"])
    assert code == 2 and "--out exists and is not a folder" in err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_a_write_error_exits_1_and_keeps_the_old_export(fixture_dir: Path, tmp_path: Path, monkeypatch) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    assert run(["--parquet", source, "--out", tmp_path])[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pickapic_shards.ShardWriter, "add", disk_full)
    code, _, err = run(["--parquet", source, "--out", tmp_path, "--pairs-per-shard", "3"])
    assert code == 1 and "No space left on device" in err and "holds either its previous export" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # staging removed, nothing else touched


def test_a_read_error_mid_file_names_the_file_and_row(fixture_dir: Path, tmp_path: Path, monkeypatch) -> None:
    original = pq.ParquetFile.iter_batches

    def failing_iter_batches(self, *args, **kwargs):
        for n, batch in enumerate(original(self, *args, **kwargs)):
            if n == 2:
                raise pa.ArrowInvalid("Couldn't deserialize thrift: corrupt page header")
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", failing_iter_batches)
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    code, _, err = run(["--parquet", source, "--out", tmp_path, "--batch-size", "16"])
    assert code == 2
    assert f"{source}: cannot read the record batch after row 32 (Couldn't deserialize thrift" in err
    assert list(tmp_path.iterdir()) == []  # nothing published, staging removed
