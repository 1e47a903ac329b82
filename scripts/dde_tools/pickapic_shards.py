"""Writing Pick-a-Pic shards for export_pickapic: ustar shards with their size and sha256, and the
staging folder that is published all at once (docs/formats.md §2)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from dde_tools.common import make_output_parent, write_marker
from dde_tools.pickapic_rows import DataError

TOOL = "export_pickapic"
INDEX_FILE = "index.json"
STAGING_PREFIX = ".staging-"
# What an export folder holds besides the marker (common.check_output's own_patterns).
OWN_PATTERNS = (INDEX_FILE, "shard-*.tar", "shard-*.tar.tmp", STAGING_PREFIX + "*")


def fsync_dir(path: Path) -> None:
    """Make the renames and unlinks inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object that hashes and counts what passes through (for tarfile)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.bytes


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | memoryview) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes pairs into `folder`/shard-NNNNNN.tar, at most `pairs_per_shard` each, keyed %09d in order."""

    def __init__(self, folder: Path, pairs_per_shard: int) -> None:
        self.folder, self.pairs_per_shard = folder, pairs_per_shard
        self.shards: list[dict] = []
        self.pairs = 0
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def add(self, meta: bytes | memoryview, jpg_0: bytes | memoryview, jpg_1: bytes | memoryview, tie: bool) -> None:
        if self._tar is None:
            self.shards.append({"file": f"shard-{len(self.shards):06d}.tar", "pairs": 0, "ties": 0})
            self._file = open(self.folder / self.shards[-1]["file"], "wb")  # noqa: SIM115 (closed in close())
            self._hashing = _HashingFile(self._file)
            self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        key = f"{self.pairs:09d}"
        _add_member(self._tar, f"{key}.json", meta)
        _add_member(self._tar, f"{key}.0.jpg", jpg_0)
        _add_member(self._tar, f"{key}.1.jpg", jpg_1)
        self.pairs += 1
        shard = self.shards[-1]
        shard["pairs"] += 1
        shard["ties"] += tie
        if shard["pairs"] == self.pairs_per_shard:
            self.close()

    def close(self) -> None:
        """Finish the open shard (if any): end blocks, fsync, size and sha256 into its entry."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1]["bytes"] = self._hashing.bytes
        self.shards[-1]["sha256"] = self._hashing.sha256.hexdigest()
        self._tar = self._file = self._hashing = None


def is_legacy_export(folder: Path) -> bool:
    """An export written before the output marker: an index.json of this format, or (a crash in
    the publish step) only shards and staging folders."""
    import fnmatch
    import json

    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return isinstance(index, dict) and index.get("format") == "dde-pickapic-shards"
    except (OSError, ValueError):
        pass
    names = os.listdir(folder)
    return any(n.startswith("shard-") for n in names) and \
        all(any(fnmatch.fnmatchcase(n, p) for p in OWN_PATTERNS) for n in names)


class StagedExport:
    """OUT/.staging-<pid>/ while an export runs; `publish` moves it into OUT.

    Holds an exclusive flock on OUT for its lifetime (a second export into OUT stops with a
    message), and removes the staging folders that crashed exports left behind.
    """

    def __init__(self, out: Path) -> None:
        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: --out exists and is not a folder; pass a folder (it is created if absent)")
        make_output_parent(out, out)
        self.out = out
        self._lock = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self._lock)
            raise DataError(f"{out}: another export_pickapic is writing into this folder; wait for it to end") from err
        for leftover in out.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.folder = out / f"{STAGING_PREFIX}{os.getpid()}"
        self.folder.mkdir()

    def publish(self, shards: list[dict], index_text: str) -> None:
        """Replace OUT's export by the staged one so that OUT always holds either the old index.json
        with its shards, or no index.json: the old index goes first, the new one comes last."""
        write_marker(self.out, TOOL, [])  # what is ours: common.MARKER plus OWN_PATTERNS
        (self.out / INDEX_FILE).unlink(missing_ok=True)
        fsync_dir(self.out)
        current = {shard["file"] for shard in shards}
        for stale in self.out.glob("shard-*.tar*"):
            if stale.name not in current:
                stale.unlink()
        for name in sorted(current):
            os.replace(self.folder / name, self.out / name)
        staged_index = self.folder / INDEX_FILE
        with open(staged_index, "w", encoding="utf-8") as file:
            file.write(index_text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staged_index, self.out / INDEX_FILE)
        fsync_dir(self.out)

    def close(self) -> None:
        """Remove the staging folder (whatever is left in it) and release the lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock)
