"""Tests of dde_tools.relabel: scores, labels, margin, kept columns, agreement, export_pickapic round trip, errors."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dde_tools import export_pickapic, fixtures, relabel
from dde_tools.annotator_fixtures import TINY_ARCH
from dde_tools.common import MARKER

KINDS = ("missing_image", "undecodable_image", "empty_caption")


def run(argv: list[str]) -> tuple[int, str, str]:
    """relabel.main in-process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = relabel.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@dataclass
class Relabelled:
    source: Path
    out: Path
    table: pa.Table  # the output
    summary: dict
    stdout: str


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """120 rows, 12 ties, one planted bad row of each export rejection kind, row groups of 50."""
    path = tmp_path_factory.mktemp("relabel_src") / "train-bad.parquet"
    fixtures.make_pickapic_parquet(path, rows=120, seed=3, bad_rows=True, row_group_size=50)
    return path


def relabel_with(source: Path, out: Path, flags: list[str], *extra: str) -> Relabelled:
    code, stdout, stderr = run(["--parquet", str(source), "--out", str(out), "--device", "cpu", *flags, *extra])
    assert code == 0, stderr
    summary = json.loads((out / "relabel_summary.json").read_text())
    return Relabelled(source, out, pq.read_table(out / source.name), summary, stdout)


@pytest.fixture(scope="session")
def hps_run(source, annotator_flags, tmp_path_factory) -> Relabelled:
    return relabel_with(source, tmp_path_factory.mktemp("relabel_hps"), annotator_flags["hps"])


@pytest.fixture(scope="session")
def margin_run(source, hps_run, annotator_flags, tmp_path_factory) -> Relabelled:
    """Margin = the 40th percentile of |score_0 - score_1|; small record batches, one pair per forward."""
    diff = np.abs(np.array(hps_run.table.column("score_0").to_pylist(), dtype=float)
                  - np.array(hps_run.table.column("score_1").to_pylist(), dtype=float))
    margin = float(np.nanpercentile(diff, 40))
    return relabel_with(source, tmp_path_factory.mktemp("relabel_margin"), annotator_flags["hps"],
                        "--margin", repr(margin), "--batch-size", "7", "--score-batch-size", "3")


def column(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist(), dtype=float)


def test_rows_and_columns_are_kept_and_human_labels_saved(source, hps_run) -> None:
    original, out = pq.read_table(source), hps_run.table
    added = ["human_label_0", "human_label_1", "score_0", "score_1", "human_best_image_uid"]
    assert out.schema.names == original.schema.names + added
    for name in original.schema.names:
        assert out.schema.field(name).type == original.schema.field(name).type
        if name not in ("label_0", "label_1", "best_image_uid"):
            assert out.column(name).equals(original.column(name)), name
    for side in ("0", "1"):
        assert out.column(f"human_label_{side}").to_pylist() == original.column(f"label_{side}").to_pylist()
    assert out.column("human_best_image_uid").to_pylist() == original.column("best_image_uid").to_pylist()


def test_scores_are_the_annotators_scores_of_both_images(hps_run, tiny_annotators) -> None:
    """hpsv2's computation, with open_clip's own loader, on a few decoded rows."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(tiny_annotators["hps"]),
                                                                 output_dict=True)
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    rows = hps_run.table.slice(0, 12).to_pylist()
    with torch.no_grad():
        for row in rows:
            if row["score_0"] is None:
                continue
            for side in ("0", "1"):
                image = Image.open(io.BytesIO(row[f"jpg_{side}"]))
                outputs = model.eval()(preprocess(image).unsqueeze(0), tokenizer([row["caption"]]))
                expected = (outputs["image_features"] @ outputs["text_features"].T)[0, 0].item()
                assert row[f"score_{side}"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("run_name", ["hps_run", "margin_run"])
def test_labels_follow_the_scores_and_the_margin(run_name: str, request) -> None:
    result: Relabelled = request.getfixturevalue(run_name)
    table, margin = result.table, result.summary["margin"]
    score_0, score_1 = column(table, "score_0"), column(table, "score_1")
    scored = ~np.isnan(score_0)
    diff = (score_0 - score_1)[scored]
    expected = np.where((diff >= margin) & (diff != 0), 1.0, np.where((-diff >= margin) & (diff != 0), 0.0, 0.5))
    label_0, label_1 = column(table, "label_0")[scored], column(table, "label_1")[scored]
    assert np.array_equal(label_0, expected) and np.array_equal(label_1, 1.0 - expected)
    rows = [r for r, s in zip(table.to_pylist(), scored) if s]
    for row in rows:
        winner = {1.0: row["image_0_uid"], 0.0: row["image_1_uid"], 0.5: ""}[row["label_0"]]
        assert row["best_image_uid"] == winner
    counts = result.summary["new_labels"]
    assert counts == {"image_0": int((expected == 1).sum()), "image_1": int((expected == 0).sum()),
                      "tie": int((expected == 0.5).sum())}
    if run_name == "margin_run":
        assert 0 < counts["tie"] < len(rows) and margin > 0
    else:
        assert counts["tie"] == 0 and margin == 0


def test_unscorable_rows_pass_through_unchanged(source, hps_run) -> None:
    original = pq.read_table(source).to_pylist()
    unscored = [i for i, row in enumerate(hps_run.table.to_pylist()) if row["score_0"] is None]
    assert len(unscored) == 3 and hps_run.summary["unscored"] == dict.fromkeys(KINDS, 1) | {"image_too_large": 0}
    for i in unscored:
        row = hps_run.table.slice(i, 1).to_pylist()[0]
        assert row["score_1"] is None
        assert (row["label_0"], row["label_1"]) == (original[i]["label_0"], original[i]["label_1"])
        assert row["best_image_uid"] == original[i]["best_image_uid"]
    assert hps_run.summary["rows"] == 120 and hps_run.summary["scored"] == 117


def test_agreement_with_the_human_labels(hps_run, margin_run) -> None:
    for result in (hps_run, margin_run):
        table = result.table
        human, new = column(table, "human_label_0"), column(table, "label_0")
        decided = ~np.isnan(column(table, "score_0")) & np.isin(human, [0.0, 1.0]) & (new != 0.5)
        assert result.summary["agreement_pairs"] == decided.sum() > 0
        assert result.summary["agreement"] == pytest.approx(np.mean(human[decided] == new[decided]))
        assert f"agreement with the human labels {result.summary['agreement']:.3f}" in result.stdout


def test_export_pickapic_takes_the_output_unchanged(margin_run, tmp_path) -> None:
    index = export_pickapic.export([margin_run.out / margin_run.source.name], tmp_path / "shards",
                                   keep_ties=True, pairs_per_shard=50)
    assert index["rows_read"] == 120
    rejected = {kind: count for kind, count in index["rejected"].items() if count}
    assert rejected == dict.fromkeys(set(KINDS) - {"bad_label"}, 1)  # the planted bad label was relabelled
    rows = margin_run.table.to_pylist()
    pairs = []
    for shard in index["shards"]:
        with open(tmp_path / "shards" / shard["file"], "rb") as handle:
            pairs += [json.loads(member) for member in _json_members(handle.read())]
    assert len(pairs) == index["pairs_written"] == 117
    for meta in pairs:
        row = rows[int(meta["source"].rsplit(":", 1)[1])]
        assert (meta["label_0"], meta["label_1"]) == (row["label_0"], row["label_1"])
    assert index["ties_kept"] == margin_run.summary["new_labels"]["tie"] > 0


def _json_members(tar_bytes: bytes) -> list[bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]


def test_small_batches_give_the_same_output(hps_run, margin_run, source, annotator_flags, tmp_path) -> None:
    again = relabel_with(source, tmp_path, annotator_flags["hps"], "--margin", repr(margin_run.summary["margin"]))
    assert again.table.drop_columns(["score_0", "score_1"]).equals(
        margin_run.table.drop_columns(["score_0", "score_1"]))
    np.testing.assert_allclose(column(again.table, "score_0"), column(margin_run.table, "score_0"),
                               rtol=1e-5, atol=1e-6)
    # Row groups of 50, 50 and 20 rows, relabelled in batches of 7: 8 + 8 + 3 row groups written.
    assert pq.ParquetFile(margin_run.out / source.name).metadata.num_row_groups == 19


@pytest.mark.parametrize("name", ["pickscore", "clip_bin"])
def test_other_annotators(name: str, fixture_dir, annotator_flags, tmp_path) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    result = relabel_with(source, tmp_path, annotator_flags[name], "--batch-size", "40")
    rows = pq.ParquetFile(source).metadata.num_rows
    assert result.summary["annotator"] == name.removesuffix("_bin") and result.summary["scored"] == rows
    assert result.table.num_rows == rows and result.table.column("score_0").null_count == 0


def test_cli_as_a_module(fixture_dir, annotator_flags, tmp_path, run_cli) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    proc = run_cli("relabel", "--parquet", str(source), "--out", str(tmp_path), *annotator_flags["clip"])
    assert proc.returncode == 0, proc.stderr
    rows = pq.ParquetFile(source).metadata.num_rows
    assert proc.stdout.startswith(f"relabel: {rows} rows, {rows} scored with clip")
    assert pq.read_table(tmp_path / source.name).num_rows == rows


def test_bad_input_is_reported(source, hps_run, annotator_flags, tmp_path) -> None:
    hps, clip = annotator_flags["hps"], annotator_flags["clip"]
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    no_label = tmp_path / "no_label.parquet"
    pq.write_table(pq.read_table(source).drop_columns(["label_1"]), no_label)
    (tmp_path / "copy").mkdir()
    same_name = tmp_path / "copy" / source.name
    same_name.write_bytes(source.read_bytes())
    cases = [
        ([str(not_parquet)], hps, "not a Parquet file"),
        ([str(no_label)], hps, "column 'label_1' is missing"),
        ([str(hps_run.out / source.name)], hps, "already relabelled"),
        ([str(source), str(same_name)], hps, "two inputs share a file name"),
        ([str(source)], [], "relabel uses exactly one annotator"),
        ([str(source)], hps + clip, "relabel uses exactly one annotator"),
        ([str(source)], ["--hps-checkpoint", str(tmp_path / "none.pt")], "--hps-checkpoint does not exist"),
        ([str(source)], [*hps, "--margin", "-1"], "--margin: out of range"),
    ]
    out = tmp_path / "out"
    for inputs, flags, fragment in cases:
        code, _, stderr = run(["--parquet", *inputs, "--out", str(out), *flags])
        assert code == 2, (fragment, stderr)
        assert stderr.startswith("relabel: error: ") and fragment in stderr, (fragment, stderr)
        assert "expected" in stderr and "found" in stderr, stderr
        assert not out.exists()
    code, _, stderr = run(["--parquet", str(source), "--out", str(source.parent), *hps])
    assert code == 2 and "output would overwrite the input" in stderr
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / source.name).write_text("not mine")
    code, _, stderr = run(["--parquet", str(source), "--out", str(notes), *hps])
    assert code == 2 and "--out is not an output of relabel" in stderr and "Traceback" not in stderr
    assert (notes / source.name).read_text() == "not mine"


def test_a_rerun_replaces_its_own_output_only(source, hps_run, annotator_flags, tmp_path) -> None:
    out = tmp_path / "out"
    relabel_with(source, out, annotator_flags["hps"])
    assert json.loads((out / MARKER).read_text())["tool"] == "relabel"
    again = relabel_with(source, out, annotator_flags["hps"], "--margin", "0.5")
    assert again.summary["new_labels"]["tie"] == 117 and sorted(p.name for p in out.iterdir()) == [
        MARKER, "relabel_summary.json", source.name]
    (out / "mine.txt").write_text("x")
    code, _, stderr = run(["--parquet", str(source), "--out", str(out), *annotator_flags["hps"]])
    assert code == 2 and "--out holds files relabel did not write" in stderr and "mine.txt" in stderr
    assert not list(tmp_path.glob("out.dde-staging-*"))


def corrupt_row_group(path: Path, target: Path, group: int) -> None:
    """A copy of `path` whose row group `group` has its jpg_0 page header overwritten."""
    column = next(c for c in (pq.ParquetFile(path).metadata.row_group(group).column(i) for i in range(19))
                  if c.path_in_schema == "jpg_0")
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 32] = b"\xff" * 32
    target.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_named(source, annotator_flags, tmp_path) -> None:
    bad = tmp_path / "damaged.parquet"
    corrupt_row_group(source, bad, 1)
    out = tmp_path / "out"
    code, _, stderr = run(["--parquet", str(bad), "--out", str(out), "--device", "cpu", *annotator_flags["hps"]])
    assert code == 2, stderr
    assert f"relabel: error: {bad}: row group 1 (rows 50..99) cannot be read" in stderr
    assert "Couldn't deserialize thrift" in stderr and "Traceback" not in stderr and stderr.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob("out.dde-staging-*"))


def big_png() -> bytes:
    """A valid 9500 x 9500 PNG (90.25 megapixels, over Pillow's 89,478,485) of a few kilobytes:
    decoded as RGB it would take 270 MB."""
    buffer = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_oversized_image_is_counted_without_decoding(source, annotator_flags, tmp_path, monkeypatch) -> None:
    table = pq.read_table(source).slice(0, 12)
    png = big_png()
    assert len(png) < 100_000
    jpg_1 = table.column("jpg_1").to_pylist()
    jpg_1[5] = png
    table = table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg_1, pa.binary()))
    path = tmp_path / "big.parquet"
    pq.write_table(table, path)
    decoded = []
    original = Image.Image.load

    def recording_load(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(Image.Image, "load", recording_load)
    result = relabel_with(path, tmp_path / "out", annotator_flags["hps"])
    assert result.summary["unscored"]["image_too_large"] == 1
    assert result.table.column("score_0").to_pylist()[5] is None
    assert result.summary["scored"] == 12 - 1 - sum(v for k, v in result.summary["unscored"].items()
                                                  if k != "image_too_large")
    assert (9500, 9500) not in decoded  # refused from the header


def test_memory_error_is_not_an_undecodable_row(source, annotator_flags, tmp_path, monkeypatch) -> None:
    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "convert", no_memory)
    out = tmp_path / "out"
    code, _, stderr = run(["--parquet", str(source), "--out", str(out), "--device", "cpu", *annotator_flags["hps"]])
    assert code == 1 and "relabel: error: out of memory" in stderr and "Traceback" not in stderr
    assert not out.exists()
