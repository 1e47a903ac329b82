"""The bounded-memory shuffle of export_pickapic (docs/formats.md §2): a two-pass bucket scatter.

Pass 1 sends each pair to one of B bucket files, drawn by a seeded hash of where it was read;
pass 2 reads one bucket at a time and yields it permuted. A uniform bucket draw followed by a
uniform permutation within each bucket is a uniform permutation of the whole export. A bucket
larger than half the memory budget (B is a guess from the parquet footers, which undercount
dictionary-encoded images) is split again the same way, streamed, before it is loaded.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

# A pair in a bucket file: meta, jpg_0, jpg_1 lengths and the tie flag, then the bytes.
_RECORD_HEADER = struct.Struct("<IIIB")
_MAX_SPLITS = 4  # a bucket still too large after this many splits holds records too large to split
Record = tuple[bytes | memoryview, bytes | memoryview, bytes | memoryview, bool]


class _BucketFiles:
    """Records appended to numbered files through buffers written out when they hold `flush_at`
    bytes in all (open, append, close: any number of files, no descriptor limit)."""

    def __init__(self, paths: list[Path], flush_at: int) -> None:
        self.paths, self.flush_at = paths, flush_at
        self._buffers: list[list[bytes]] = [[] for _ in paths]
        self._buffered = 0

    def add(self, index: int, record: bytes) -> None:
        self._buffers[index].append(record)
        self._buffered += len(record)
        if self._buffered >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        for path, records in zip(self.paths, self._buffers):
            if records:
                with open(path, "ab") as file:
                    file.writelines(records)
                records.clear()
        self._buffered = 0


def _pack(meta: bytes, jpg_0: bytes, jpg_1: bytes, tie: bool) -> bytes:
    return _RECORD_HEADER.pack(len(meta), len(jpg_0), len(jpg_1), tie) + meta + jpg_0 + jpg_1


def _read_records(data: bytes) -> Iterator[Record]:
    """The records of a bucket held in memory, as views into `data` (no copy)."""
    view, offset = memoryview(data), 0
    while offset < len(data):
        sizes = _RECORD_HEADER.unpack_from(data, offset)
        offset += _RECORD_HEADER.size
        parts = []
        for size in sizes[:3]:
            parts.append(view[offset : offset + size])
            offset += size
        yield parts[0], parts[1], parts[2], bool(sizes[3])


def _stream_records(file: BinaryIO) -> Iterator[Record]:
    """The records of a bucket file, one at a time."""
    while header := file.read(_RECORD_HEADER.size):
        sizes = _RECORD_HEADER.unpack(header)
        yield file.read(sizes[0]), file.read(sizes[1]), file.read(sizes[2]), bool(sizes[3])


class BucketScatter:
    """Pass 1 (`add`) into `buckets` files in `folder`; pass 2 (`drain`). Memory: about
    `memory_bytes` (pass 1's write buffers, then one bucket of at most half of it)."""

    def __init__(self, folder: Path, buckets: int, seed: int, memory_bytes: int) -> None:
        self.folder, self.buckets, self.seed, self.memory_bytes = folder, buckets, seed, memory_bytes
        folder.mkdir()
        self._files = _BucketFiles([self._path((bucket,)) for bucket in range(buckets)], max(1, memory_bytes // 2))

    def bucket_of(self, origin: str) -> int:
        """The bucket of the pair read at `origin` ("file-number:row"); independent of batching."""
        digest = hashlib.blake2b(f"{self.seed}:{origin}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.buckets

    def add(self, origin: str, meta: bytes, jpg_0: bytes, jpg_1: bytes, tie: bool) -> None:
        self._files.add(self.bucket_of(origin), _pack(meta, jpg_0, jpg_1, tie))

    def drain(self) -> Iterator[Record]:
        """Pass 2: (meta, jpg_0, jpg_1, tie) of every pair, bucket by bucket, each bucket permuted."""
        self._files.flush()
        for bucket in range(self.buckets):
            yield from self._drain((bucket,))
        self.folder.rmdir()

    def _drain(self, key: tuple[int, ...]) -> Iterator[Record]:
        path = self._path(key)
        if not path.exists():
            return
        size = path.stat().st_size
        if size > self.memory_bytes // 2 and len(key) <= _MAX_SPLITS:
            yield from self._split(path, key, math.ceil(2 * size / self.memory_bytes))
            return
        records = list(_read_records(path.read_bytes()))
        path.unlink()
        for i in np.random.default_rng([self.seed, *key]).permutation(len(records)):
            yield records[i]

    def _split(self, path: Path, key: tuple[int, ...], parts: int) -> Iterator[Record]:
        """Scatter the bucket file at `key` into `parts` files, streamed, then drain each."""
        files = _BucketFiles([self._path((*key, part)) for part in range(parts)], max(1, self.memory_bytes // 2))
        draws = np.random.default_rng([self.seed, *key, parts])
        with open(path, "rb") as file:
            for record in _stream_records(file):
                files.add(int(draws.integers(parts)), _pack(*record))
        files.flush()
        path.unlink()
        for part in range(parts):
            yield from self._drain((*key, part))

    def _path(self, key: tuple[int, ...]) -> Path:
        return self.folder / ("bucket-" + "-".join(f"{k:06d}" for k in key) + ".bin")
