"""Tests of dde_tools.pickapic_rows through the exporter: every hostile row class is rejected with its
reason and names its row; what the trainer decodes (JPEG, PNG) is kept unchanged."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from dde_tools import export_pickapic, fixtures, hostile_rows, pickapic_rows


def encode(image: Image.Image, fmt: str) -> bytes:
    return hostile_rows.encode(image, fmt)


@pytest.fixture(scope="module")
def hostile_export(hostile_parquet, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hostile")
    assert export_pickapic.main(["--parquet", str(hostile_parquet[0]), "--out", str(out)]) == 0
    return out, json.loads((out / "index.json").read_text())


def shard_sources(out: Path, index: dict) -> dict[str, tuple[bytes, bytes]]:
    """source -> (jpg_0, jpg_1) of every pair in the shards."""
    pairs = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            members = tar.getmembers()
            for i in range(0, len(members), 3):
                meta = json.loads(tar.extractfile(members[i]).read())
                pairs[meta["source"]] = tuple(tar.extractfile(m).read() for m in members[i + 1 : i + 3])
    return pairs


def test_counts_add_up_with_every_reason(hostile_parquet, hostile_export) -> None:
    _, planted = hostile_parquet
    _, index = hostile_export
    assert index["rejected"] == {reason: planted[reason] for reason in pickapic_rows.REASONS}
    assert all(index["rejected"][reason] == 2 for reason in pickapic_rows.REASONS)
    assert index["rows_read"] == 400 and index["ties_dropped"] == 40
    assert index["pairs_written"] == index["rows_read"] - index["ties_dropped"] - sum(index["rejected"].values())
    assert index["pairs_written"] == 400 - 40 - 2 * len(pickapic_rows.REASONS)
    assert index["image_checks"] == {"formats": ["JPEG", "PNG"], "pillow_formats": ["JPEG", "MPO", "PNG"],
                                     "max_pixels": 89_478_485, "max_aspect_ratio": 20.0}


EXPECTED_DETAILS = {
    "unsupported_format": [r"jpg_0: WEBP 64x64 \(accepted: JPEG, PNG\)", r"jpg_1: TIFF 64x64"],
    "image_too_large": [r"jpg_0: Image size \(4225000000 pixels\) exceeds limit",
                        r"jpg_1: 10000x9000 = 90000000 pixels > 89478485"],
    "bad_aspect_ratio": [r"jpg_0: 65000x1: longer/shorter side > 20", r"jpg_1: 30x630: longer/shorter side > 20"],
    "bad_caption_encoding": [r"caption is not valid UTF-8 \(byte 0xff at offset 11"] * 2,
    "bad_field_encoding": [r"image_0_uid is not valid UTF-8 \(byte 0xc3",
                           r"image_1_uid is not valid UTF-8 \(byte 0xc3"],
    "duplicate_pair": [r"same image_0_uid, image_1_uid and caption as train-hostile\.parquet:\d+"] * 2,
}


@pytest.mark.parametrize("reason", sorted(EXPECTED_DETAILS))
def test_hostile_rows_are_rejected_and_named(hostile_parquet, hostile_export, reason: str) -> None:
    path, _ = hostile_parquet
    out, index = hostile_export
    rows = [r for r in index["rejected_rows"] if r["reason"] == reason]
    details = sorted(r["detail"] for r in rows)
    assert len(details) == 2
    for pattern in EXPECTED_DETAILS[reason]:
        assert sum(bool(re.match(pattern, d)) for d in details) >= 1, (pattern, details)
    for row in rows:
        assert re.fullmatch(rf"{re.escape(path.name)}:\d+", row["source"])
    if reason == "duplicate_pair":  # the first occurrence is kept
        kept = shard_sources(out, index)
        for row in rows:
            first = row["detail"].rsplit(" as ", 1)[1]
            assert first in kept and int(first.split(":")[1]) < int(row["source"].split(":")[1])


def test_png_pairs_are_kept_unchanged(hostile_parquet, hostile_export) -> None:
    path, planted = hostile_parquet
    out, index = hostile_export
    table = pq.read_table(path, columns=["jpg_0", "jpg_1"]).to_pylist()
    png_rows = [i for i, r in enumerate(table) if any(b and b.startswith(b"\x89PNG\r\n") and
                                                       Image.open(io.BytesIO(b)).size == (72, 96) for b in r.values())]
    assert len(png_rows) == planted["png"] == 2
    kept = shard_sources(out, index)
    for i in png_rows:
        assert kept[f"{path.name}:{i}"] == (table[i]["jpg_0"], table[i]["jpg_1"])


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(Image.new(mode, size, (0, 100, 200, 0)[: len(mode)] if mode != "L" else 90), "JPEG")


def _progressive_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 100, 200)).save(buffer, format="JPEG", progressive=True)
    assert b"\xff\xc2" in buffer.getvalue()  # SOF2: progressive
    return buffer.getvalue()


ACCEPTED = {
    "jpeg_rgb": lambda: _jpeg(),
    "jpeg_gray": lambda: _jpeg("L"),
    "jpeg_progressive": lambda: _progressive_jpeg(),
    "png_rgb": lambda: encode(Image.new("RGB", (70, 90), "red"), "PNG"),
    "png_rgba": lambda: encode(Image.new("RGBA", (70, 90), (1, 2, 3, 4)), "PNG"),
    "png_palette": lambda: encode(Image.new("P", (70, 90), 3), "PNG"),
    "png_16bit": lambda: encode(Image.new("I;16", (70, 90), 4000), "PNG"),
    "aspect_20_wide": lambda: encode(Image.new("RGB", (400, 20), "red"), "PNG"),
    "aspect_20_tall": lambda: _jpeg(size=(20, 400)),
}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_what_the_trainer_decodes_is_accepted(kind: str) -> None:
    assert pickapic_rows.image_problem(ACCEPTED[kind]()) is None


REJECTED = {
    "webp": (lambda: encode(Image.new("RGB", (64, 64)), "WEBP"), "unsupported_format", "WEBP 64x64"),
    "tiff": (lambda: encode(Image.new("RGB", (64, 64)), "TIFF"), "unsupported_format", "TIFF 64x64"),
    "gif": (lambda: encode(Image.new("RGB", (64, 64)), "GIF"), "unsupported_format", "GIF 64x64"),
    "bmp": (lambda: encode(Image.new("RGB", (64, 64)), "BMP"), "unsupported_format", "BMP 64x64"),
    "jpeg_cmyk": (lambda: _jpeg("CMYK"), "unsupported_format", "JPEG in mode CMYK"),
    "header_65000_square": (lambda: hostile_rows.with_jpeg_size(_jpeg(), 65000, 65000), "image_too_large",
                            "4225000000 pixels"),
    "header_just_over": (lambda: hostile_rows.with_jpeg_size(_jpeg(), 9459, 9460), "image_too_large",
                         "9459x9460 = 89482140 pixels > 89478485"),
    "aspect_21_wide": (lambda: encode(Image.new("RGB", (420, 20), "red"), "PNG"), "bad_aspect_ratio", "420x20"),
    "line_65000x1": (lambda: _jpeg(size=(65000, 1)), "bad_aspect_ratio", "65000x1"),
    "truncated_png": (lambda: encode(Image.new("RGB", (70, 90), "red"), "PNG")[:-30], "undecodable_image", "PNG"),
    "garbage": (lambda: b"GIF87 not an image", "undecodable_image", "UnidentifiedImageError"),
    "jpeg_garbage": (lambda: b"\xff\xd8\xff\xe0 not a jpeg", "undecodable_image", "OSError"),
}


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_what_the_trainer_cannot_use_is_rejected(kind: str) -> None:
    make, reason, detail = REJECTED[kind]
    problem = pickapic_rows.image_problem(make())
    assert problem is not None and problem[0] == reason and detail in problem[1], problem


@pytest.mark.parametrize(
    "width, height, reason",
    [(9459, 9459, None), (9459, 9460, "image_too_large"), (400, 20, None), (20, 400, None),
     (401, 20, "bad_aspect_ratio"), (1, 21, "bad_aspect_ratio"), (1, 1, None)],
)
def test_size_limits_at_their_boundaries(width: int, height: int, reason: str | None) -> None:
    assert 9459 * 9459 < pickapic_rows.MAX_PIXELS < 9459 * 9460
    problem = pickapic_rows.shape_problem(width, height)
    assert (problem[0] if problem else None) == reason


def test_truncated_jpeg_is_rejected_even_if_pillow_is_told_to_load_truncated(monkeypatch) -> None:
    good = fixtures.draw_jpeg(np.random.default_rng(0))
    truncated = good[: len(good) * 2 // 3]
    Image.open(io.BytesIO(truncated)).verify()  # verify() alone would accept it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other import might set it
    assert pickapic_rows.image_problem(good) is None
    problem = pickapic_rows.image_problem(truncated)
    assert problem[0] == "undecodable_image" and "truncated" in problem[1]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_text_fields_are_decoded_or_named() -> None:
    row = {"caption": "a cat".encode(), "image_0_uid": b"u0", "image_1_uid": None}
    assert pickapic_rows.decode_text(row) is None and row == {"caption": "a cat", "image_0_uid": "u0",
                                                              "image_1_uid": None}
    bad = {"caption": "ok".encode(), "image_0_uid": b"u0", "image_1_uid": b"x\x80y"}
    assert pickapic_rows.decode_text(bad) == (
        "bad_field_encoding", "image_1_uid is not valid UTF-8 (byte 0x80 at offset 1: invalid start byte)")


@pytest.mark.parametrize("label_0, label_1", [(math.nan, 1.0), (1.0, math.nan), (math.inf, 0.0)])
def test_non_finite_labels_are_bad_labels(label_0: float, label_1: float) -> None:
    row = {"jpg_0": _jpeg(), "jpg_1": _jpeg(), "caption": "a cat", "label_0": label_0, "label_1": label_1}
    assert pickapic_rows.check_row(row)[0] == "bad_label"


def test_rows_repeated_across_files_are_duplicates(fixture_dir: Path, tmp_path: Path) -> None:
    source = fixture_dir / "pickapic" / "train-00000.parquet"
    labels = pq.read_table(source, columns=["label_0"]).column("label_0").to_pylist()
    rows, ties = len(labels), labels.count(0.5)
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / source.name  # same base name: sources read "train-00000.parquet:N" in both
    copy.write_bytes(source.read_bytes())
    index = export_pickapic.export([source, copy], tmp_path / "out")
    assert (index["rows_read"], index["ties_dropped"], index["pairs_written"]) == (2 * rows, ties, rows - ties)
    assert index["rejected"]["duplicate_pair"] == rows and sum(index["rejected"].values()) == rows
    assert index["rejected_rows"][0] == {"source": f"{source.name}:0", "reason": "duplicate_pair",
                                         "detail": f"same image_0_uid, image_1_uid and caption as {source.name}:0"}


# ---------------------------------------------------------------------------------------------
# Properties of the row checks (hypothesis, a small example budget: a few seconds)

LABELS = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.none(), st.floats(allow_nan=True, allow_infinity=True))
CAPTIONS = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["", "   \t", "a red cat"]))


@st.composite
def images(draw) -> bytes | None:
    """Image bytes as rows carry them: absent, garbage, or an encoded image, maybe damaged."""
    kind = draw(st.sampled_from(["none", "empty", "garbage"] + ["image"] * 9))
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    width, height = draw(st.integers(1, 48)), draw(st.sampled_from([1, 2, 24, 48, 1000]))
    fmt = draw(st.sampled_from(["JPEG", "PNG", "PNG", "WEBP", "GIF", "BMP"]))
    mode = draw(st.sampled_from(["RGB", "L"] + (["CMYK"] if fmt == "JPEG" else ["RGBA", "P"] if fmt == "PNG" else [])))
    colour = draw(st.integers(0, 255))
    data = hostile_rows.encode(Image.new(mode, (width, height), colour), fmt)
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    return data


@st.composite
def rows(draw) -> dict:
    """Mostly rows whose cheap fields are valid (so that the image checks are reached), some not."""
    if draw(st.integers(0, 3)):
        label_0 = draw(st.sampled_from([0.0, 0.5, 1.0]))
        return {"jpg_0": draw(images()), "jpg_1": draw(images()), "caption": "a red cat", "label_0": label_0,
                "label_1": 1.0 - label_0}
    label_0 = draw(LABELS)
    label_1 = draw(st.one_of(st.just(None if label_0 is None else 1.0 - label_0), LABELS))
    return {"jpg_0": draw(images()), "jpg_1": draw(images()), "caption": draw(CAPTIONS),
            "label_0": label_0, "label_1": label_1}


def _decodes_as_the_trainer_needs(data: bytes) -> bool:
    with pickapic_rows._strict_pillow(), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        ok = image.format in pickapic_rows.ACCEPTED_FORMATS and width * height <= pickapic_rows.MAX_PIXELS and \
            max(width, height) <= pickapic_rows.MAX_ASPECT_RATIO * min(width, height)
        image.load()
        return ok and image.mode != "CMYK"


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_check_row_property(row: dict) -> None:
    """check_row never raises; a kept row is one the trainer can use; the cheap reasons come first,
    in the documented order; the same row gets the same answer."""
    problem = pickapic_rows.check_row(dict(row))
    assert problem == pickapic_rows.check_row(dict(row))
    if any(not row[side] for side in ("jpg_0", "jpg_1")):
        assert problem[0] == "missing_image"
        return
    if row["caption"] is None or not row["caption"].strip():
        assert problem[0] == "empty_caption"
        return
    label_0, label_1 = row["label_0"], row["label_1"]
    if label_0 not in (0.0, 0.5, 1.0) or label_1 is None or label_1 != 1.0 - label_0:
        assert problem[0] == "bad_label"
        return
    if problem is None:
        assert all(_decodes_as_the_trainer_needs(row[side]) for side in ("jpg_0", "jpg_1"))
    else:
        reason, detail = problem
        assert reason in pickapic_rows.REASONS and reason not in ("missing_image", "empty_caption", "bad_label")
        assert isinstance(detail, str) and detail.startswith(("jpg_0: ", "jpg_1: "))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({name: st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode))
                              for name in pickapic_rows.TEXT_FIELDS}))
def test_decode_text_property(raw: dict) -> None:
    """decode_text flags exactly the rows with a field that is not UTF-8, and decodes the others."""
    row = dict(raw)
    problem = pickapic_rows.decode_text(row)
    def valid(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    if all(valid(b) for b in raw.values()):
        assert problem is None and row == {k: v.decode("utf-8") for k, v in raw.items()}
    else:
        first_bad = next(k for k in pickapic_rows.TEXT_FIELDS if not valid(raw[k]))
        assert problem[0] == ("bad_caption_encoding" if first_bad == "caption" else "bad_field_encoding")
        assert problem[1].startswith(f"{first_bad} is not valid UTF-8")
