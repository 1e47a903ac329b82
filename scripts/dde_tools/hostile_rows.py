"""Hostile Pick-a-Pic rows for the exporter's tests (fixtures.make_pickapic_parquet(hostile_rows=True)).

Each kind but `png` is a row export_pickapic must reject with the reason of the same name;
`png` rows carry a valid PNG and must be kept. Variants cycle through the forms a kind takes.
"""

from __future__ import annotations

import io

from PIL import Image

# The rejection reasons planted, then the kinds that must be kept.
KINDS = (
    "unsupported_format",
    "image_too_large",
    "bad_aspect_ratio",
    "bad_caption_encoding",
    "bad_field_encoding",
    "duplicate_pair",
    "png",
)
INVALID_UTF8 = b"a cat on a \xff\xfe mat"


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with the size in its baseline frame header (SOF0) replaced: the header lies."""
    at = jpeg.find(b"\xff\xc0")
    if at < 0:
        raise ValueError("no baseline SOF0 marker in the JPEG")
    return jpeg[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 9 :]


def _colour(variant: int) -> tuple[int, int, int]:
    return (40 * variant % 256, 90, 200)


def hostile_image(kind: str, variant: int) -> bytes:
    """The image bytes of an image-kind row."""
    colour = _colour(variant)
    if kind == "unsupported_format":
        form = variant % 3
        if form == 2:
            return encode(Image.new("CMYK", (64, 64), (0, 128, 255, 0)), "JPEG")
        return encode(Image.new("RGB", (64, 64), colour), ("WEBP", "TIFF")[form])
    if kind == "image_too_large":
        small = encode(Image.new("RGB", (16, 16), colour), "JPEG")
        # over twice Pillow's budget (Image.open raises), or just over it (Pillow only warns)
        return with_jpeg_size(small, *((65000, 65000), (10000, 9000))[variant % 2])
    if kind == "bad_aspect_ratio":
        size, fmt = ((65000, 1), "JPEG") if variant % 2 == 0 else ((30, 630), "PNG")
        return encode(Image.new("RGB", size, colour), fmt)
    if kind == "png":
        return encode(Image.new("RGB", (72, 96), colour), "PNG")
    raise ValueError(f"{kind} is not an image kind")


def plant(row: dict, kind: str, variant: int, earlier: dict | None) -> bool:
    """Make `row` hostile in the way `kind` names; `earlier` is a kept row for `duplicate_pair`.

    Text kinds put bytes (not str) in the field: the parquet writer stores them unvalidated.
    Returns False when the kind cannot be planted here (a duplicate with no earlier row).
    """
    side = f"jpg_{variant % 2}"
    if kind in ("unsupported_format", "image_too_large", "bad_aspect_ratio", "png"):
        row[side] = hostile_image(kind, variant)
    elif kind == "bad_caption_encoding":
        row["caption"] = INVALID_UTF8
    elif kind == "bad_field_encoding":
        row[f"image_{variant % 2}_uid"] = b"\xc3\x28" + row[f"image_{variant % 2}_uid"].encode()[2:]
    elif kind == "duplicate_pair":
        if earlier is None:
            return False
        row.update({key: earlier[key] for key in ("image_0_uid", "image_1_uid", "caption")})
    else:
        raise ValueError(f"unknown hostile kind {kind}")
    return True
