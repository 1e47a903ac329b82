"""Image decode + preprocessing throughput per core: dde's C++ pipeline vs PIL.

    .venv/bin/python bench/decode_throughput.py [--images 40] [--repeat 3] [--size 512]

Writes synthetic photo-like JPEGs at Pick-a-Pic-like sizes (512x512, 768x768, 1024x1024 and
640x896, quality 90) and runs, on ONE core each (taskset to CPU 0, OMP_NUM_THREADS=1):

- dde: tests/cpp/dde_image_probe --repeat N (libjpeg-turbo decode, Pillow-exact bilinear
  resize of the shorter side to --size, center crop, [-1, 1] float32 tensor);
- PIL: what Diffusion-DPO's train.py does per image with torchvision on PIL images, written
  with the equivalent Pillow/numpy calls (torchvision is not a dependency of this project):
  Image.open().convert("RGB") -> resize(BILINEAR) -> crop -> float32 (x / 255 - 0.5) / 0.5.

A pair is two images, so pairs/s = images/s / 2. Prints a markdown table (with the ratio)
and writes it as JSON to bench/results/decode-<date>.json. Not a test: the numbers depend on
the machine and its load (recorded as os.getloadavg()).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(512, 512), (768, 768), (1024, 1024), (896, 640)]  # (height, width)


def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus mild noise (as tests/python/test_image_parity.py)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    return np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)


def pil_pipeline(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return (array.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def time_pil(files: list[Path], size: int, repeat: int) -> float:
    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    for _ in range(repeat):
        for data in blobs:
            pil_pipeline(data, size)
    return len(blobs) * repeat / (time.perf_counter() - start)


def time_dde(probe: Path, files: list[Path], size: int, repeat: int) -> float:
    seconds = 0.0
    for f in files:
        out = subprocess.run(
            ["taskset", "-c", "0", str(probe), "--input", str(f), "--resize-shorter", str(size),
             "--center-crop", str(size), "--repeat", str(repeat)],
            capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        ).stdout
        ms = float(out.split("ms_per_image")[1].split()[0])
        seconds += ms / 1000.0 * repeat
    return len(files) * repeat / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="JPEG files, cycling through the sizes")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the files per measurement")
    parser.add_argument("--size", type=int, default=512, help="training resolution")
    parser.add_argument("--runs", type=int, default=3, help="measurements per row (median shown)")
    args = parser.parse_args()
    probe = Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")) / "tests" / "cpp" / "dde_image_probe"
    if not probe.is_file():
        raise SystemExit(f"{probe} is not built: run scripts/build.sh")
    os.sched_setaffinity(0, {0})  # the PIL side on one core too
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        by_size: dict[tuple[int, int], list[Path]] = {s: [] for s in SIZES}
        for i in range(args.images):
            h, w = SIZES[i % len(SIZES)]
            path = Path(tmp, f"{i:03d}.jpg")
            Image.fromarray(synthetic_photo(h, w, i)).save(path, quality=90)
            by_size[(h, w)].append(path)
        for (h, w), files in list(by_size.items()) + [(("all", "all"), sorted(Path(tmp).glob("*.jpg")))]:
            dde = statistics.median(time_dde(probe, files, args.size, args.repeat) for _ in range(args.runs))
            pil = statistics.median(time_pil(files, args.size, args.repeat) for _ in range(args.runs))
            rows.append({"source": f"{h}x{w}", "files": len(files), "dde_pairs_per_s": dde / 2,
                         "pil_pairs_per_s": pil / 2, "ratio": dde / pil})
    print(f"| source HxW | files | dde pairs/s/core | PIL pairs/s/core | dde / PIL |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['source']} | {r['files']} | {r['dde_pairs_per_s']:.1f} | {r['pil_pairs_per_s']:.1f} | "
              f"{r['ratio']:.2f}x |")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"decode-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"args": vars(args), "loadavg": os.getloadavg(), "rows": rows}, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
