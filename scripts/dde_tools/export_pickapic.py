"""Stream Pick-a-Pic parquet files into reproducible ustar shards + index.json (docs/formats.md §2).

CLI: python -m dde_tools.export_pickapic --parquet F [F ...] --out DIR [--tokenizer DIR ...]
     [--keep-ties] [--pairs-per-shard N] [--batch-size N]
     [--shuffle-seed S | --no-shuffle] [--shuffle-memory-mb M]

Without --tokenizer the shards carry captions only (index.json "tokenizers": []): one export
serves every model family, and dde_train tokenizes the captions in C++ with the model's tokenizer
folders. With --tokenizer DIR (repeated, in the text encoders' order) every pair also stores that
tokenizer's ids, and dde_train uses them.

Reads with ParquetFile.iter_batches; rows the trainer could not use are rejected and counted
by reason (pickapic_rows). Kept pairs are shuffled over the whole export in bounded memory
(pickapic_shuffle.BucketScatter) unless --no-shuffle. Everything is written into
DIR/.staging-<pid>/ and published at the end: the old index.json is removed first and the new
one renamed in last, so DIR never holds an index over shards it does not describe.
DIR must be absent, empty or an earlier export (its marker common.MARKER, or an index.json of
this format): a folder holding anything else is refused, never written into.
Exit codes: 0 done, 1 cannot write (disk full, permissions), 2 bad input (unreadable or
non-parquet file, missing column, wrong Arrow type, unloadable tokenizer, bad option, an --out
that is not an earlier export).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from dde_tools.common import check_output, run_main, vocab_sha256
from dde_tools.pickapic_rows import (
    ACCEPTED_FORMATS,
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    REASONS,
    DataError,
    DuplicateFilter,
    check_row,
    decode_text,
    image_bytes_estimate,
    iter_rows,
    open_parquet,
)
from dde_tools.pickapic_shards import OWN_PATTERNS, TOOL, ShardWriter, StagedExport, is_legacy_export
from dde_tools.pickapic_shuffle import BucketScatter

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = ["DataError", "export", "main", "summary"]

INDEX_VERSION = 2
MAX_REJECTED_ROWS = 10_000
PAIR_FIELDS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "ranking_id")


@dataclass
class ExportStats:
    rows_read: int = 0
    pairs_written: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    rejected_rows: list[dict] = field(default_factory=list)

    def reject(self, source: str, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if len(self.rejected_rows) < MAX_REJECTED_ROWS:
            self.rejected_rows.append({"source": source, "reason": reason, "detail": detail})


@dataclass
class ExportOptions:
    tokenizer_dirs: list[Path]
    keep_ties: bool = False
    pairs_per_shard: int = 1000
    batch_size: int = 256
    shuffle_seed: int | None = 0  # None: keep the order of the parquet files
    shuffle_memory_mb: int = 1024

    def validate(self) -> None:
        for name in ("pairs_per_shard", "batch_size", "shuffle_memory_mb"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} is {getattr(self, name)}, expected an integer >= 1")
        if self.shuffle_seed is not None and self.shuffle_seed < 0:
            raise DataError(f"--shuffle-seed is {self.shuffle_seed}, expected an integer >= 0")


def load_tokenizers(dirs: Sequence[Path]) -> list[CLIPTokenizer]:
    """A CLIPTokenizer per folder, in order; a JSON file of the folder that does not parse is named."""
    if not dirs:
        return []
    from transformers import CLIPTokenizer  # seconds to import: only when tokenizing

    tokenizers = []
    for path in dirs:
        for file in sorted(Path(path).glob("*.json")):
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, OSError) as err:
                raise DataError(f"{file}: not a valid JSON file ({err}); copy the tokenizer folder again") from err
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(path))
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{path}: cannot load a CLIPTokenizer ({err})") from err
    return tokenizers


def tokenize(tokenizers: list[CLIPTokenizer], captions: list[str]) -> list[list[list[int]]]:
    """For each caption, one max_length-padded id list per tokenizer."""
    per_tokenizer = [
        t(captions, padding="max_length", truncation=True, max_length=t.model_max_length).input_ids if captions else []
        for t in tokenizers
    ]
    return [[ids[i] for ids in per_tokenizer] for i in range(len(captions))]


def bucket_count(parquet_files: Sequence[Path], memory_mb: int) -> int:
    """Buckets of about memory_mb / 2 each, from the files' footers (so the same for every run)."""
    estimate = sum(image_bytes_estimate(open_parquet(path)) for path in parquet_files)
    return max(1, math.ceil(2 * estimate / (memory_mb * 2**20)))


def _kept_rows(path: Path, rows: list[dict], first_row: int, stats: ExportStats, duplicates: DuplicateFilter,
               keep_ties: bool) -> list[tuple[int, dict]]:
    """(row number, row) of the rows of one record batch that pass every check; the rest counted."""
    kept = []
    for row_number, row in enumerate(rows, start=first_row):
        source = f"{path.name}:{row_number}"
        problem = decode_text(row) or check_row(row) or duplicates.check(row, source)
        if problem:
            stats.reject(source, *problem)
        elif row["label_0"] == 0.5 and not keep_ties:
            stats.ties_dropped += 1
        else:
            kept.append((row_number, row))
    stats.rows_read += len(rows)
    return kept


def _scatter(parquet_files: Sequence[Path], options: ExportOptions, tokenizers: list[CLIPTokenizer],
             sink: Callable[[str, bytes, bytes, bytes, bool], None], stats: ExportStats) -> None:
    """Pass 1: read, check and tokenize every row; each kept pair goes to `sink(origin, meta, jpg_0,
    jpg_1, tie)`, origin being "file-number:row"."""
    duplicates = DuplicateFilter()
    for file_number, path in enumerate(parquet_files):
        path, row_number = Path(path), 0
        for rows in iter_rows(open_parquet(path), path, options.batch_size):
            kept = _kept_rows(path, rows, row_number, stats, duplicates, options.keep_ties)
            row_number += len(rows)
            input_ids = tokenize(tokenizers, [row["caption"] for _, row in kept])
            for (number, row), ids in zip(kept, input_ids):
                meta = {key: row[key] for key in PAIR_FIELDS} | {"source": f"{path.name}:{number}"}
                if tokenizers:
                    meta["input_ids"] = ids
                meta_bytes = json.dumps(meta, allow_nan=False).encode("utf-8")
                tie = row["label_0"] == 0.5
                sink(f"{file_number}:{number}", meta_bytes, row["jpg_0"], row["jpg_1"], tie)
                stats.pairs_written += 1
                stats.ties_kept += tie


def _write_shards(parquet_files: Sequence[Path], options: ExportOptions, tokenizers: list[CLIPTokenizer],
                  staging: StagedExport, stats: ExportStats) -> tuple[list[dict], dict | None]:
    """Both passes into the staging folder; returns the shard entries and the shuffle record."""
    writer = ShardWriter(staging.folder, options.pairs_per_shard)
    if options.shuffle_seed is None:
        _scatter(parquet_files, options, tokenizers, lambda _origin, *pair: writer.add(*pair), stats)
        writer.close()
        return writer.shards, None
    buckets = bucket_count(parquet_files, options.shuffle_memory_mb)
    memory = options.shuffle_memory_mb * 2**20
    scatter = BucketScatter(staging.folder / "buckets", buckets, options.shuffle_seed, memory)
    _scatter(parquet_files, options, tokenizers, scatter.add, stats)
    for record in scatter.drain():
        writer.add(*record)
    writer.close()
    return writer.shards, {"seed": options.shuffle_seed, "buckets": buckets, "memory_mb": options.shuffle_memory_mb}


def _index(parquet_files: Sequence[Path], options: ExportOptions, tokenizers: list[CLIPTokenizer],
           shards: list[dict], shuffle: dict | None, stats: ExportStats) -> dict:
    return {
        "format": "dde-pickapic-shards",
        "version": INDEX_VERSION,
        "sources": [str(Path(p).resolve()) for p in parquet_files],
        "shards": shards,
        "rows_read": stats.rows_read,
        "pairs_written": stats.pairs_written,
        "ties_dropped": stats.ties_dropped,
        "ties_kept": stats.ties_kept,
        "rejected": stats.rejected,
        "rejected_rows": stats.rejected_rows,
        "rejected_rows_truncated": sum(stats.rejected.values()) > len(stats.rejected_rows),
        "shuffle": shuffle,
        "image_checks": {"formats": ["JPEG", "PNG"], "pillow_formats": list(ACCEPTED_FORMATS),
                         "max_pixels": MAX_PIXELS, "max_aspect_ratio": MAX_ASPECT_RATIO},
        "tokenizers": [
            {"name": d.name, "vocab_sha256": vocab_sha256(d), "max_length": t.model_max_length, "vocab_size": len(t)}
            for d, t in zip(options.tokenizer_dirs, tokenizers)
        ],
    }


def export(
    parquet_files: Sequence[Path],
    out: Path,
    tokenizer_dirs: Sequence[Path] = (),
    keep_ties: bool = False,
    pairs_per_shard: int = 1000,
    batch_size: int = 256,
    shuffle_seed: int | None = 0,
    shuffle_memory_mb: int = 1024,
) -> dict:
    """Export the files into `out`; return the index (also written to out/index.json).

    Every input is checked before anything is written; `out` is only changed at the end.
    """
    options = ExportOptions([Path(d) for d in tokenizer_dirs], keep_ties, pairs_per_shard, batch_size,
                            shuffle_seed, shuffle_memory_mb)
    options.validate()
    for path in parquet_files:
        open_parquet(path)
    tokenizers = load_tokenizers(options.tokenizer_dirs)
    real_out = check_output(TOOL, Path(out), inputs=[*map(Path, parquet_files), *options.tokenizer_dirs],
                            own_patterns=OWN_PATTERNS, legacy=is_legacy_export)
    staging, stats = StagedExport(real_out), ExportStats()
    try:
        shards, shuffle = _write_shards(parquet_files, options, tokenizers, staging, stats)
        index = _index(parquet_files, options, tokenizers, shards, shuffle, stats)
        staging.publish(shards, json.dumps(index, indent=2, allow_nan=False) + "\n")
    finally:
        staging.close()
    return index


def summary(index: dict, out: Path) -> str:
    """The one-line report printed at the end of an export."""
    rejected = index["rejected"]
    reasons = ", ".join(f"{k}={v}" for k, v in rejected.items() if v)
    shuffle = index["shuffle"]
    order = f"shuffled (seed {shuffle['seed']}, {shuffle['buckets']} buckets)" if shuffle else "in parquet order"
    return (
        f"export_pickapic: {index['rows_read']} rows -> {index['pairs_written']} pairs in "
        f"{len(index['shards'])} shards, {order}; ties dropped {index['ties_dropped']}, kept {index['ties_kept']}; "
        f"rejected {sum(rejected.values())} ({reasons or 'none'}) -> {out / 'index.json'}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parquet", type=Path, nargs="+", required=True, help="Pick-a-Pic parquet files")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and index.json")
    parser.add_argument("--tokenizer", type=Path, action="append", default=[],
                        help="CLIP tokenizer folder; repeat for several (input_ids in this order); none: captions only, "
                             "tokenized by dde_train")
    parser.add_argument("--keep-ties", action="store_true", help="keep pairs labelled 0.5/0.5")
    parser.add_argument("--pairs-per-shard", type=int, default=1000, help="pairs per tar shard (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per parquet record batch (default 256)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle over all pairs (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the order of the parquet rows")
    parser.add_argument("--shuffle-memory-mb", type=int, default=1024,
                        help="memory for the shuffle's buffers and one bucket (default 1024)")
    return parser


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds, so the staging folder is removed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)

    def body() -> int:
        index = export(args.parquet, args.out, args.tokenizer, args.keep_ties, args.pairs_per_shard, args.batch_size,
                       None if args.no_shuffle else args.shuffle_seed, args.shuffle_memory_mb)
        print(summary(index, args.out))
        return 0

    try:
        return run_main(TOOL, body, on_os_error=f"; {args.out} holds either its previous export or no index.json; "
                        "free space or fix permissions and run again")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
