"""Tests of dde_tools.export_pickapic: counts, shard contents, ties, bad files, reproducibility, streaming.

Row checks are in test_pickapic_rows.py; shuffle, shard hashes and crash safety in test_pickapic_shards.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import CLIPTokenizer

from dde_tools import export_pickapic, fixtures, pickapic_rows
from dde_tools.common import MARKER


def run(argv: list[str]) -> tuple[int, str]:
    """export_pickapic.main in-process; returns (exit code, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = export_pickapic.main(argv)
    return code, stdout.getvalue()


def read_pairs(out: Path, index: dict) -> list[tuple[str, dict, bytes, bytes]]:
    """Every (key, json, jpg_0, jpg_1) in shard order, checking the ustar layout on the way."""
    pairs = []
    for shard in index["shards"]:
        raw = (out / shard["file"]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = tar.getmembers()
            assert tar.pax_headers == {}
            assert len(members) == 3 * shard["pairs"]
            for member in members:
                assert raw[member.offset + 257 : member.offset + 265] == b"ustar\x0000"  # POSIX ustar magic
                assert member.type == tarfile.REGTYPE and (member.mtime, member.mode) == (0, 0o644)
                assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
            for i in range(0, len(members), 3):
                key = members[i].name.removesuffix(".json")
                assert [m.name for m in members[i : i + 3]] == [f"{key}.json", f"{key}.0.jpg", f"{key}.1.jpg"]
                meta = json.loads(tar.extractfile(members[i]).read())
                jpg_0, jpg_1 = (tar.extractfile(m).read() for m in members[i + 1 : i + 3])
                pairs.append((key, meta, jpg_0, jpg_1))
    return pairs


@pytest.fixture(scope="session")
def tokenizer_dirs(fixture_dir: Path) -> list[Path]:
    """Two tokenizers with different padding (EOS and "!")."""
    return [fixture_dir / "sd15" / "tokenizer", fixture_dir / "sdxl" / "tokenizer_2"]


@pytest.fixture(scope="session")
def default_export(bad_parquet, tokenizer_dirs, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("shards")
    args = ["--parquet", str(bad_parquet[0]), "--out", str(out), "--pairs-per-shard", "500"]
    code, stdout = run(args + [a for d in tokenizer_dirs for a in ("--tokenizer", str(d))])
    assert code == 0
    return out, json.loads((out / "index.json").read_text()), stdout


def test_counts_add_up(bad_parquet, default_export) -> None:
    _, planted = bad_parquet
    _, index, stdout = default_export
    assert (index["format"], index["version"]) == ("dde-pickapic-shards", 2)
    assert index["sources"] == [str(bad_parquet[0].resolve())]
    assert index["rows_read"] == planted["rows"] == 2000
    assert index["ties_dropped"] == planted["ties"] == 200 and index["ties_kept"] == 0
    assert index["rejected"] == {kind: planted.get(kind, 0) for kind in pickapic_rows.REASONS}
    assert index["pairs_written"] == 2000 - 200 - 40 == index["rows_read"] - index["ties_dropped"] - 40
    assert [s["pairs"] for s in index["shards"]] == [500, 500, 500, 260]
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert len(index["rejected_rows"]) == 40 and index["rejected_rows_truncated"] is False
    for kind in fixtures.REJECTION_KINDS:
        assert sum(r["reason"] == kind for r in index["rejected_rows"]) == planted[kind]
    assert stdout.count("\n") == 1
    assert "2000 rows -> 1760 pairs in 4 shards, shuffled (seed 0, 1 buckets); ties dropped 200, kept 0; " \
           "rejected 40 (missing_image=10, empty_caption=10, bad_label=10, undecodable_image=10)" in stdout


def test_rejected_rows_name_the_source_row(bad_parquet, default_export) -> None:
    path, _ = bad_parquet
    _, index, _ = default_export
    table = pq.read_table(path, columns=["jpg_0", "jpg_1", "caption", "label_0", "label_1"]).to_pylist()
    for rejected in index["rejected_rows"]:
        name, row_number = rejected["source"].split(":")
        row = table[int(row_number)]
        assert name == path.name
        assert pickapic_rows.check_row(row) == (rejected["reason"], rejected["detail"])
    details = {r["detail"] for r in index["rejected_rows"]}
    assert "label_0=0.3, label_1=0.7" in details and "caption is null" in details


def test_pairs_equal_the_parquet_rows(bad_parquet, default_export, tokenizer_dirs) -> None:
    path, _ = bad_parquet
    out, index, _ = default_export
    table = pq.read_table(path).to_pylist()
    pairs = read_pairs(out, index)
    assert [key for key, *_ in pairs] == [f"{i:09d}" for i in range(index["pairs_written"])]
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs]
    captions = [meta["caption"] for _, meta, _, _ in pairs]
    expected_ids = [t(captions, padding="max_length", truncation=True, max_length=77).input_ids for t in tokenizers]
    rows_seen = []
    for n, (_, meta, jpg_0, jpg_1) in enumerate(pairs):
        name, row_number = meta["source"].split(":")
        row = table[int(row_number)]
        assert name == path.name
        rows_seen.append(int(row_number))
        assert (jpg_0, jpg_1) == (row["jpg_0"], row["jpg_1"])
        for key in ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "ranking_id"):
            assert meta[key] == row[key], key
        assert {meta["label_0"], meta["label_1"]} == {0.0, 1.0}  # ties dropped, winner not moved
        assert meta["input_ids"] == [expected_ids[0][n], expected_ids[1][n]]
    assert {pairs[0][1]["input_ids"][0][-1], pairs[0][1]["input_ids"][1][-1]} == {tokenizers[0].eos_token_id, 0}
    rejected = {int(r["source"].split(":")[1]) for r in index["rejected_rows"]}
    ties = {i for i, row in enumerate(table) if row["label_0"] == 0.5} - rejected
    assert sorted(rows_seen) == sorted(set(range(len(table))) - rejected - ties)  # each kept row once
    assert index["tokenizers"] == [
        {"name": d.name, "vocab_sha256": hashlib.sha256((d / "vocab.json").read_bytes()).hexdigest(), "max_length": 77,
         "vocab_size": len(CLIPTokenizer.from_pretrained(d))}
        for d in tokenizer_dirs
    ]


def test_keep_ties_keeps_them_unordered(bad_parquet, tmp_path: Path) -> None:
    path, planted = bad_parquet
    code, _ = run(["--parquet", str(path), "--out", str(tmp_path), "--keep-ties", "--batch-size", "512"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert code == 0
    assert index["ties_kept"] == planted["ties"] and index["ties_dropped"] == 0
    assert index["pairs_written"] == 2000 - 40 and sum(s["ties"] for s in index["shards"]) == 200
    assert [s["pairs"] for s in index["shards"]] == [1000, 960] and index["tokenizers"] == []
    pairs = read_pairs(tmp_path, index)
    assert sum(meta["label_0"] == 0.5 for _, meta, _, _ in pairs) == 200
    assert all("input_ids" not in meta for _, meta, _, _ in pairs)
    assert {meta["label_0"] for _, meta, _, _ in pairs} == {0.0, 0.5, 1.0}


def test_rerun_gives_identical_bytes(bad_parquet, default_export, tokenizer_dirs, tmp_path: Path) -> None:
    out, index, _ = default_export
    args = ["--parquet", str(bad_parquet[0]), "--out", str(tmp_path), "--pairs-per-shard", "500"]
    assert run(args + [a for d in tokenizer_dirs for a in ("--tokenizer", str(d))])[0] == 0
    for name in [s["file"] for s in index["shards"]] + ["index.json"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out.iterdir())


def test_streams_batches_into_many_small_shards(fixture_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls, batch_lengths = [], []
    original = pq.ParquetFile.iter_batches

    def recording_iter_batches(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in original(self, *args, **kwargs):
            batch_lengths.append(batch.num_rows)
            yield batch

    def forbidden(*args, **kwargs):
        raise AssertionError("the export must stream, not read whole tables")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording_iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    source = fixture_dir / "pickapic" / "train-00000.parquet"  # a multiple of 16 rows, some ties
    rows = pq.ParquetFile(source).metadata.num_rows
    assert rows % 16 == 0 and rows >= 64
    code, _ = run(["--parquet", str(source), "--out", str(tmp_path), "--pairs-per-shard", "5", "--batch-size", "16"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert code == 0
    assert [c["batch_size"] for c in calls] == [16] and batch_lengths == [16] * (rows // 16)
    assert index["rows_read"] == rows and index["pairs_written"] == rows - index["ties_dropped"]
    counts = [s["pairs"] for s in index["shards"]]
    assert len(counts) == -(-index["pairs_written"] // 5) >= 10
    assert set(counts[:-1]) == {5} and 1 <= counts[-1] <= 5
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [s["file"] for s in index["shards"]]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".staging-*"))


def test_rerun_with_fewer_shards_removes_stale_ones(fixture_dir: Path, tmp_path: Path) -> None:
    source = str(fixture_dir / "pickapic" / "train-00000.parquet")
    assert run(["--parquet", source, "--out", str(tmp_path), "--pairs-per-shard", "10"])[0] == 0
    assert len(list(tmp_path.glob("shard-*.tar"))) > 3
    assert run(["--parquet", source, "--out", str(tmp_path), "--pairs-per-shard", "1000"])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "index.json", "shard-000000.tar"]


def test_rejected_rows_list_is_capped(tmp_path: Path, monkeypatch) -> None:
    planted = fixtures.make_pickapic_parquet(tmp_path / "small.parquet", rows=400, seed=3, bad_rows=True)
    monkeypatch.setattr(export_pickapic, "MAX_REJECTED_ROWS", 3)
    assert run(["--parquet", str(tmp_path / "small.parquet"), "--out", str(tmp_path / "out")])[0] == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sum(index["rejected"].values()) == 4 * planted["bad_label"] == 8
    assert len(index["rejected_rows"]) == 3 and index["rejected_rows_truncated"] is True


def _small_table(tmp_path: Path) -> pa.Table:
    fixtures.make_pickapic_parquet(tmp_path / "ok.parquet", rows=8, seed=1, tie_fraction=0.0)
    return pq.read_table(tmp_path / "ok.parquet")


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing_column", "column 'label_0' is missing (expected Arrow type double)"),
        ("wrong_type", "column 'label_0' has Arrow type string, expected double"),
        ("wrong_binary", "column 'jpg_1' has Arrow type string, expected binary or large_binary"),
        ("not_parquet", "not a Parquet file"),
        ("absent", "file not found"),
    ],
)
def test_bad_files_exit_2_with_a_message(tmp_path: Path, capsys, kind: str, expected: str) -> None:
    bad = tmp_path / f"{kind}.parquet"
    table = _small_table(tmp_path)
    if kind == "missing_column":
        pq.write_table(table.drop_columns(["label_0"]), bad)
    elif kind == "wrong_type":
        pq.write_table(table.set_column(table.schema.get_field_index("label_0"), "label_0",
                                        table["label_0"].cast(pa.string())), bad)
    elif kind == "wrong_binary":
        strings = pa.array(["x"] * table.num_rows, pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", strings), bad)
    elif kind == "not_parquet":
        bad.write_text("caption,label_0\na cat,1\n")
    out = tmp_path / "out"
    code = export_pickapic.main(["--parquet", str(tmp_path / "ok.parquet"), str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"export_pickapic: error: {bad}: {expected}" in err
    assert not out.exists()  # every file is checked before anything is written


def test_cli_runs_as_a_module(fixture_dir: Path, tmp_path: Path, run_cli) -> None:
    tokenizer = fixture_dir / "sd15" / "tokenizer"
    proc = run_cli("export_pickapic", "--parquet", str(fixture_dir / "pickapic" / "train-00000.parquet"),
                   "--out", str(tmp_path), "--tokenizer", str(tokenizer))
    assert proc.returncode == 0, proc.stderr
    rows = pq.ParquetFile(fixture_dir / "pickapic" / "train-00000.parquet").metadata.num_rows
    assert proc.stdout.startswith(f"export_pickapic: {rows} rows -> ") and proc.stdout.count("\n") == 1
    assert json.loads((tmp_path / "index.json").read_text())["tokenizers"][0]["name"] == "tokenizer"


def test_a_broken_tokenizer_json_is_named(fixture_dir: Path, tmp_path: Path, capsys) -> None:
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(fixture_dir / "sd15" / "tokenizer", tokenizer)
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 77,')
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    code = export_pickapic.main(["--parquet", str(source), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"export_pickapic: error: {tokenizer / 'tokenizer_config.json'}: not a valid JSON file (" in err
    assert not (tmp_path / "out").exists()
