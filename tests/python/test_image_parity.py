"""Pillow parity of the C++ image pipeline (src/data/image.cpp), driven through the
tests/cpp/tools/dde_image_probe helper.

Reference: what Diffusion-DPO's train.py does per image with torchvision on PIL images,
written with the equivalent Pillow calls (torchvision is not a dependency):
Image.open(...).convert("RGB") -> Resize(size, BILINEAR) = Image.resize(torchvision size,
Image.BILINEAR) -> CenterCrop(size) = Image.crop at int(round((h - size) / 2.0)).

The JPEG path compares libjpeg-turbo (the system's) with Pillow's bundled libjpeg-turbo: the
decoded pixels alone are within one level, and the resize of identical pixels is within one level
of Pillow's (the raw-pixel tests). Through both, the whole pipeline is within two levels: Pillow's
bilinear resize is a convex combination rounded to an integer, so inputs one level apart give
outputs at most one level apart (rounding is monotone and round(x + 1) = round(x) + 1), to which the
resize's own level adds at most one. PNG and CMYK JPEG decodes are compared with Pillow's
convert("RGB") directly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("DDE_BUILD_DIR", REPO / "build"))
PROBE = BUILD_DIR / "tests" / "cpp" / "dde_image_probe"


@pytest.fixture
def probe() -> Path:
    """The probe binary; a test that needs it fails (not skips) when it is not built."""
    return PROBE


def run_probe(probe: Path, out: Path, *args: str) -> np.ndarray:
    if not probe.is_file():
        pytest.fail(
            f"{PROBE} is not built: run `cmake --build {BUILD_DIR} --target dde_image_probe`, "
            "or point DDE_BUILD_DIR at the build folder that has it"
        )
    result = subprocess.run([str(probe), *args, "--output", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"dde_image_probe {' '.join(args)} failed: {result.stderr}"
    height, width = (int(v) for v in result.stdout.split()[:2])
    return np.fromfile(out, dtype=np.uint8).reshape(height, width, 3)


def torchvision_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's _compute_resized_output_size for an int size: (new_h, new_w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def reference_pipeline(image: Image.Image, size: int) -> np.ndarray:
    """Resize(size, BILINEAR) then CenterCrop(size), as torchvision does on PIL images."""
    new_h, new_w = torchvision_size(image.height, image.width, size)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour fields, a sharp-edged block and mild noise: photo-like JPEG content."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    y0, x0 = height // 4, width // 3
    smooth[y0 : y0 + height // 3, x0 : x0 + width // 4] = (230, 30, 60)
    noisy = smooth + rng.integers(-8, 9, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def diff_stats(actual: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    return float(diff.mean()), int(diff.max())


# (height, width, target size, Pillow subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, quality)
JPEG_CASES = [
    (512, 512, 512, 2, 90),  # no resize
    (1024, 1024, 512, 2, 90),  # 2x downscale, the common Pick-a-Pic case
    (768, 1344, 512, 2, 85),  # landscape
    (1344, 768, 512, 2, 95),  # portrait
    (300, 200, 512, 0, 90),  # upscale
    (517, 931, 256, 1, 80),  # odd sizes, non-integer factor, 4:2:2
    (640, 480, 512, 2, 75),  # slight upscale
]


@pytest.mark.parametrize("height,width,size,subsampling,quality", JPEG_CASES)
def test_jpeg_pipeline_matches_pillow(probe, tmp_path, height, width, size, subsampling, quality):
    path = tmp_path / "in.jpg"
    Image.fromarray(synthetic_photo(height, width, seed=height * 7 + width)).save(
        path, "JPEG", quality=quality, subsampling=subsampling
    )
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(path), "--resize-shorter", str(size),
                       "--center-crop", str(size))
    with Image.open(path) as image:
        expected = reference_pipeline(image.convert("RGB"), size)
    mean, worst = diff_stats(actual, expected)
    print(f"jpeg {height}x{width}->{size} sub={subsampling} q={quality}: mean {mean:.4f} max {worst} levels")
    assert worst <= 2, f"max abs diff {worst} levels (decode and resize are each within one)"
    assert mean < 1.0, f"mean abs diff {mean:.3f} levels (>= 1/255)"


def test_grayscale_jpeg_becomes_rgb(probe, tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(synthetic_photo(400, 600, seed=3)).convert("L").save(path, "JPEG", quality=90)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(path), "--resize-shorter", "256",
                       "--center-crop", "256")
    with Image.open(path) as image:
        expected = reference_pipeline(image.convert("RGB"), 256)
    mean, worst = diff_stats(actual, expected)
    print(f"jpeg gray 400x600->256: mean {mean:.4f} max {worst} levels")
    assert worst <= 2 and mean < 1.0


@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_decode_alone_matches_pillow(probe, tmp_path, subsampling):
    """Both sides decode with libjpeg-turbo's islow IDCT and fancy upsampling."""
    path = tmp_path / "in.jpg"
    Image.fromarray(synthetic_photo(333, 517, seed=subsampling)).save(path, "JPEG", quality=90,
                                                                      subsampling=subsampling)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(path))
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    mean, worst = diff_stats(actual, expected)
    print(f"jpeg decode sub={subsampling}: mean {mean:.4f} max {worst} levels")
    assert mean < 0.01 and worst <= 1


def test_cmyk_jpeg_matches_pillow(probe, tmp_path):
    """Adobe-style inverted CMYK, converted with Pillow's cmyk2rgb formula."""
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(synthetic_photo(120, 90, seed=11)).convert("CMYK").save(path, "JPEG", quality=95)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(path))
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        expected = np.asarray(image.convert("RGB"))
    mean, worst = diff_stats(actual, expected)
    print(f"jpeg cmyk: mean {mean:.4f} max {worst} levels")
    assert worst <= 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_png_decode_matches_pillow(probe, tmp_path, mode):
    path = tmp_path / "in.png"
    Image.fromarray(synthetic_photo(70, 50, seed=4)).convert(mode).save(path, "PNG")
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(path))
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(actual, expected)


# (input h, w) -> (output h, w) for resize_bilinear on identical pixels.
RAW_RESIZES = [
    ((37, 53), (16, 20)),
    ((100, 100), (33, 71)),  # Pillow 13 runs the vertical pass first here
    ((300, 100), (150, 50)),  # tall image, vertical pass first
    ((200, 100), (100, 50)),  # at the pass-order boundary: horizontal first
    ((64, 48), (128, 96)),  # 2x upscale
    ((13, 200), (50, 7)),
    ((1024, 1536), (512, 768)),
    ((1000, 667), (767, 512)),
    ((512, 768), (512, 768)),  # identity
]


@pytest.mark.parametrize("in_hw,out_hw", RAW_RESIZES)
def test_resize_matches_pillow_on_identical_pixels(probe, tmp_path, in_hw, out_hw):
    pixels = np.random.default_rng(in_hw[0] * 31 + in_hw[1]).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    raw = tmp_path / "in.raw"
    pixels.tofile(raw)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(raw), "--raw", str(in_hw[0]), str(in_hw[1]),
                       "--resize", str(out_hw[0]), str(out_hw[1]))
    expected = np.asarray(Image.fromarray(pixels).resize((out_hw[1], out_hw[0]), Image.BILINEAR))
    mean, worst = diff_stats(actual, expected)
    print(f"raw {in_hw}->{out_hw}: mean {mean:.4f} max {worst} levels")
    assert worst <= 1


@pytest.mark.parametrize(
    "in_hw,size", [((600, 800), 512), ((333, 1000), 256), ((1024, 1024), 512), ((61, 47), 32), ((1400, 600), 512)]
)
def test_shorter_side_and_center_crop_on_identical_pixels(probe, tmp_path, in_hw, size):
    pixels = synthetic_photo(*in_hw, seed=in_hw[0])
    raw = tmp_path / "in.raw"
    pixels.tofile(raw)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(raw), "--raw", str(in_hw[0]), str(in_hw[1]),
                       "--resize-shorter", str(size), "--center-crop", str(size))
    expected = reference_pipeline(Image.fromarray(pixels), size)
    mean, worst = diff_stats(actual, expected)
    print(f"raw pipeline {in_hw}->{size}: mean {mean:.4f} max {worst} levels")
    assert worst <= 1


def test_crop_and_flip_are_exact(probe, tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    raw = tmp_path / "in.raw"
    pixels.tofile(raw)
    actual = run_probe(probe, tmp_path / "out.raw", "--input", str(raw), "--raw", "30", "40", "--crop", "3", "5",
                       "20", "25", "--hflip")
    expected = np.asarray(Image.fromarray(pixels).crop((5, 3, 30, 23)).transpose(Image.FLIP_LEFT_RIGHT))
    np.testing.assert_array_equal(actual, expected)
