"""Relabel Pick-a-Pic pairs with an annotator: both images are scored, the higher score wins.

CLI: python -m dde_tools.relabel --parquet F [F ...] --out DIR  (one annotator's flags:
     --pickscore-model DIR --pickscore-processor DIR | --hps-checkpoint FILE | --clip-weights DIR)
     [--margin M] [--batch-size N] [--device auto]

For each input file, OUT/<same name> holds the same rows and columns in the same order, with
  label_0, label_1     the new labels: 1/0 when score_0 - score_1 >= margin, 0/1 when
                       score_1 - score_0 >= margin, 0.5/0.5 (a tie) otherwise (always on equal scores)
  best_image_uid       the new winner's uid, "" on a tie (when the column exists)
  human_label_0, human_label_1, human_best_image_uid   the original values
  score_0, score_1     the annotator's scores of (jpg_0, caption) and (jpg_1, caption)
Rows that cannot be scored keep their labels and get null scores, counted by reason in
relabel_summary.json's `unscored`: missing_image (null or empty), image_too_large (the header
announces more than Pillow's 89,478,485 pixels: refused before any pixel is decoded, so memory
stays bounded; export_pickapic rejects such a row too), undecodable_image (Pillow cannot decode
it), empty_caption. Running out of memory is an error, never an "undecodable" row. The margin is
in the annotator's units (PickScore ~20, HPS ~0.27, CLIP ~30). Agreement = among the scored
pairs whose human and new labels are both decided (not ties), the fraction where they pick the
same image; printed and written to OUT/relabel_summary.json. Reads one parquet row group at a
time, relabels it in record batches of --batch-size rows and decodes --score-batch-size images
at a time, so memory is bounded by a row group (ParquetFile.iter_batches is not: on pyarrow 26
it kept most of a file's image bytes allocated, see bench/README.md). A row group that cannot be
read (a corrupt file) stops the run with exit 2, naming the file, the row group and its rows.

OUT is written as a staging folder next to it and renamed into place when every file is done;
an existing OUT must be an earlier relabel output (common.MARKER) or empty. Exit codes: 0 done,
1 a write failed or memory ran out, 2 bad input.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dde_tools import annotators as ann
from dde_tools.annotators import ToolError
from dde_tools.common import (
    MAX_IMAGE_PIXELS,
    ImageTooLarge,
    StagedOutput,
    check_output,
    open_image_rgb,
    run_main,
    write_json_atomic,
    writing,
)
from dde_tools.export_pickapic import DataError, open_parquet

TOOL = "relabel"
NEW_COLUMNS = ("human_label_0", "human_label_1", "score_0", "score_1")
UNSCORED = ("missing_image", "image_too_large", "undecodable_image", "empty_caption")
SUMMARY_FILE = "relabel_summary.json"
OWN_PATTERNS = ("*.parquet", "*.parquet.tmp", SUMMARY_FILE, SUMMARY_FILE + ".tmp")


@dataclass
class Counts:
    rows: int = 0
    scored: int = 0
    unscored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(UNSCORED, 0))
    new_labels: dict[str, int] = field(default_factory=lambda: {"image_0": 0, "image_1": 0, "tie": 0})
    decided: int = 0  # scored pairs with a human and a new winner
    agreed: int = 0


def decode(data: bytes | None) -> Image.Image | str:
    """The RGB image, or the reason it cannot be scored. The pixel count is checked from the header
    before any pixel is decoded; a MemoryError is raised, not taken for corrupt data."""
    if not data:
        return "missing_image"
    try:
        return open_image_rgb(data, MAX_IMAGE_PIXELS)
    except ImageTooLarge:
        return "image_too_large"
    except MemoryError:
        raise
    except Exception:  # Pillow raises many types for corrupt data
        return "undecodable_image"


def new_labels(score_0: np.ndarray, score_1: np.ndarray, margin: float) -> np.ndarray:
    """label_0 per pair: 1 when image 0 wins by at least `margin`, 0 when image 1 does, else 0.5."""
    diff = score_0 - score_1
    decided = (np.abs(diff) >= margin) & (diff != 0)
    return np.where(decided, (diff > 0).astype(float), 0.5)


def score_pairs(annotator: ann.Annotator, jpgs: list[tuple], captions: list, batch_size: int,
                counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """score_0, score_1 per row (NaN where unscorable), decoding `batch_size` pairs at a time."""
    scores = np.full((len(captions), 2), np.nan)
    for chunk in ann.batches(len(captions), batch_size):
        rows, images, prompts = [], [], []
        for row in range(chunk.start, chunk.stop):
            pair = [decode(jpg) for jpg in jpgs[row]]
            reason = next((p for p in pair if isinstance(p, str)), None)
            caption = captions[row]
            if reason is None and (caption is None or not caption.strip()):
                reason = "empty_caption"
            if reason:
                counts.unscored[reason] += 1
                continue
            rows.append(row)
            images += pair
            prompts += [caption, caption]
        if rows:
            scores[rows] = annotator.score(images, prompts).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


def relabel_table(table: pa.Table, annotator: ann.Annotator, margin: float, batch_size: int,
                  counts: Counts) -> pa.Table:
    """One record batch, relabelled (see the module docstring)."""
    jpgs = list(zip(table.column("jpg_0").to_pylist(), table.column("jpg_1").to_pylist()))
    score_0, score_1 = score_pairs(annotator, jpgs, table.column("caption").to_pylist(), batch_size, counts)
    human_0 = table.column("label_0").to_numpy(zero_copy_only=False).astype(float)
    scored = ~np.isnan(score_0)
    label_0 = new_labels(np.nan_to_num(score_0), np.nan_to_num(score_1), margin)
    count_labels(counts, label_0[scored], human_0[scored])
    counts.rows += table.num_rows
    counts.scored += int(scored.sum())
    # Unscored rows keep every original value.
    relabelled = {"label_0": label_0, "label_1": 1.0 - label_0}
    if "best_image_uid" in table.column_names:
        uids = zip(table.column("image_0_uid").to_pylist(), table.column("image_1_uid").to_pylist())
        relabelled["best_image_uid"] = ["" if label == 0.5 else u0 if label == 1.0 else u1
                                        for label, (u0, u1) in zip(label_0, uids)]
    columns = {name: pc.if_else(pa.array(scored), pa.array(values, table.schema.field(name).type),
                                table.column(name).combine_chunks()) for name, values in relabelled.items()}
    added = {"human_label_0": table.column("label_0"), "human_label_1": table.column("label_1"),
             "score_0": pa.array(score_0, mask=~scored), "score_1": pa.array(score_1, mask=~scored)}
    if "best_image_uid" in table.column_names:
        added["human_best_image_uid"] = table.column("best_image_uid")
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), table.schema.field(name), values)
    for name, values in added.items():
        table = table.append_column(name, values)
    return table


def count_labels(counts: Counts, label_0: np.ndarray, human_0: np.ndarray) -> None:
    counts.new_labels["image_0"] += int((label_0 == 1.0).sum())
    counts.new_labels["image_1"] += int((label_0 == 0.0).sum())
    counts.new_labels["tie"] += int((label_0 == 0.5).sum())
    decided = (label_0 != 0.5) & ((human_0 == 0.0) | (human_0 == 1.0))
    counts.decided += int(decided.sum())
    counts.agreed += int((label_0[decided] == human_0[decided]).sum())


def output_path(source: Path, out: Path, seen: set[str]) -> Path:
    """OUT/<name of source>, refusing to overwrite the source or to write one name twice."""
    target = out / source.name
    if target.resolve() == source.resolve():
        raise ToolError(source, "output would overwrite the input", "--out a folder other than the input's",
                        str(out), "Pass another --out.")
    if source.name in seen:
        raise ToolError(source, "two inputs share a file name", "distinct file names (outputs keep them)",
                        source.name, "Rename one of the inputs.")
    seen.add(source.name)
    return target


def check_inputs(paths: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs; every input is checked before anything is written."""
    seen: set[str] = set()
    pairs = []
    for path in paths:
        try:
            schema = open_parquet(path).schema_arrow
        except DataError as err:
            raise ToolError(path, "not a Pick-a-Pic parquet file", "columns as in docs/formats.md §2",
                            str(err).removeprefix(f"{path}: "), "Pass the original Pick-a-Pic parquet.") from err
        already = [c for c in (*NEW_COLUMNS, "human_best_image_uid") if c in schema.names]
        if already:
            raise ToolError(path, "already relabelled", "a file without the relabel columns", f"columns {already}",
                            "Relabel the original Pick-a-Pic file (its human labels are in human_label_*).")
        pairs.append((Path(path), output_path(Path(path), out, seen)))
    return pairs


def iter_tables(parquet: pq.ParquetFile, batch_size: int, source: Path) -> Iterator[pa.Table]:
    """Tables of at most `batch_size` rows, in file order, reading one row group at a time."""
    first_row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as err:
            raise ToolError(source, f"row group {group} (rows {first_row}..{first_row + rows - 1}) cannot be read",
                            "a readable parquet row group", f"{type(err).__name__}: {err}".replace("\n", " ")[:200],
                            "The file is damaged: download or copy it again.") from err
        first_row += rows
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def relabel_file(source: Path, target: Path, annotator: ann.Annotator, args: argparse.Namespace,
                 counts: Counts) -> None:
    parquet = pq.ParquetFile(source)
    pairs_per_forward = max(1, args.score_batch_size // 2)
    writer = None
    try:
        for batch in iter_tables(parquet, args.batch_size, source):
            table = relabel_table(batch, annotator, args.margin, pairs_per_forward, counts)
            with writing(target):
                writer = writer or pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
    finally:
        if writer is not None:
            with writing(target):
                writer.close()
    if writer is None:  # no rows: an empty file with the output schema
        empty = relabel_table(parquet.schema_arrow.empty_table(), annotator, args.margin, 1, counts)
        with writing(target):
            pq.write_table(empty, target)


def summary(counts: Counts, spec: ann.AnnotatorSpec, args: argparse.Namespace, files: list[dict]) -> dict:
    return {"format": "dde-relabel-summary", "version": 1, "annotator": spec.name, "files": files,
            "weights": str(spec.path), "arch": None if spec.name == "pickscore" else spec.arch,
            "margin": args.margin, "rows": counts.rows, "scored": counts.scored, "unscored": counts.unscored,
            "new_labels": counts.new_labels, "agreement_pairs": counts.decided,
            "agreement": counts.agreed / counts.decided if counts.decided else None}


def _legacy_output(folder: Path) -> bool:
    """A relabel output written before the output marker: its relabel_summary.json."""
    import json

    try:
        return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8")).get("format") == "dde-relabel-summary"
    except (OSError, ValueError, AttributeError):
        return False


def relabel(args: argparse.Namespace) -> dict:
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--margin", args.margin, 0)):
        if not value >= low or value == float("inf"):
            raise ToolError(flag, "out of range", f">= {low}", str(value), f"Pass {flag} >= {low}.")
    specs = ann.specs_from_args(args)
    if len(specs) != 1:
        raise ToolError("annotator flags", "relabel uses exactly one annotator", "the files of one of "
                        f"{ann.KINDS}", str([s.name for s in specs]), "Name one annotator's files.")
    pairs = check_inputs(args.parquet, args.out)
    out = check_output(TOOL, args.out, inputs=[*map(Path, args.parquet), specs[0].path], own_patterns=OWN_PATTERNS,
                       legacy=_legacy_output)
    annotator = ann.load(specs[0], ann.resolve_device(args.device))
    counts, files = Counts(), []
    with StagedOutput(TOOL, out) as stage:
        for source, target in pairs:
            before = counts.rows
            relabel_file(source, stage.folder / target.name, annotator, args, counts)
            files.append({"source": str(source.resolve()), "output": str(out / target.name),
                          "rows": counts.rows - before})
        result = summary(counts, specs[0], args, files)
        write_json_atomic(stage.folder / SUMMARY_FILE, result)
        stage.publish()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parquet", type=Path, nargs="+", required=True, help="Pick-a-Pic parquet files")
    parser.add_argument("--out", type=Path, required=True, help="output folder (one parquet per input)")
    parser.add_argument("--margin", type=float, default=0.0, help="score difference under which a pair is a tie")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per parquet record batch (default 256)")
    parser.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda, cuda:N")
    ann.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        result = relabel(args)
        agreement = "n/a" if result["agreement"] is None else f"{result['agreement']:.3f}"
        print(f"relabel: {result['rows']} rows, {result['scored']} scored with {result['annotator']} "
              f"(unscored {result['unscored']}); new labels {result['new_labels']} (margin {result['margin']}); "
              f"agreement with the human labels {agreement} over {result['agreement_pairs']} decided pairs "
              f"-> {args.out / SUMMARY_FILE}")
        return 0

    return run_main(TOOL, body, on_os_error=f"; {args.out} was left as it was")


if __name__ == "__main__":
    raise SystemExit(main())
