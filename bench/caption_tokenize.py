"""What caption-only shards cost the loader per pair: C++ tokenization against image decoding.

    .venv/bin/python bench/caption_tokenize.py [--captions 3000] [--repeat 3] [--images 8]

A caption-only pair is tokenized in the decode worker that also decodes its two images
(src/data/pair_loader_decode.cpp): once per text encoder, so once for SD1.5 and twice for SDXL.
This measures, in one run and on ONE core each (taskset -c 0, OMP_NUM_THREADS=1):

- tokenize: build/dde_tokenize (the same text::ClipTokenizer the loader calls) on the
  Pick-a-Pic-like captions of dde_tools.caption_set (kind "pickapic"), with CLIP's full
  49,408-token vocabulary (dde_tools.clip_vocab: SD1.5's tokenizer, and SDXL's tokenizer_2
  padding with "!"); the time to load the vocabulary is measured apart (--repeat 0) and taken
  off;
- decode: build/tests/cpp/dde_image_probe --repeat (libjpeg-turbo decode, resize of the shorter
  side to 512, center crop) on synthetic 512x512 and 1024x1024 JPEGs, two images a pair.

Prints a markdown table (µs per pair and the tokenization's share of the pair's decode time) and
writes it as JSON to bench/results/caption-tokenize-<date>.json. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
BUILD = Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "scripts")}


def one_core(command: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *command]


def tokenize_seconds(tokenizer: Path, captions: Path) -> float:
    """Wall seconds of dde_tokenize over the caption file (the vocabulary load included)."""
    start = time.perf_counter()
    with open(captions, "rb") as stdin:
        subprocess.run(one_core([str(BUILD / "dde_tokenize"), str(tokenizer)]), stdin=stdin,
                       stdout=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - start


def decode_ms_per_image(jpeg: Path, repeat: int) -> float:
    out = subprocess.run(one_core([str(BUILD / "tests" / "cpp" / "dde_image_probe"), "--input", str(jpeg),
                                   "--resize-shorter", "512", "--center-crop", "512", "--repeat", str(repeat)]),
                         capture_output=True, text=True, check=True, env=ENV).stdout
    return float(out.split("ms_per_image")[1].split()[0])


def photo(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 32 + 2, size // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=3000, help="Pick-a-Pic-like captions tokenized")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (the median is reported)")
    parser.add_argument("--images", type=int, default=20, help="decodes per JPEG size and pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        python = str(ROOT / ".venv" / "bin" / "python")
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            subprocess.run([python, "-m", "dde_tools.clip_vocab", "--out", str(scratch / name), "--pad-token", pad],
                           check=True, env=ENV, capture_output=True)
        subprocess.run([python, "-m", "dde_tools.caption_set", "--out", str(scratch / "all.txt"), "--kinds"],
                       check=True, env=ENV, capture_output=True)
        lines = [line.split("\t", 1)[1] for line in (scratch / "all.txt").read_text(encoding="utf-8").splitlines()
                 if line.startswith("pickapic\t")]
        picked = (lines * (args.captions // max(1, len(lines)) + 1))[:args.captions]
        (scratch / "captions.txt").write_text("\n".join(picked) + "\n", encoding="utf-8")
        (scratch / "none.txt").write_text("", encoding="utf-8")
        for size in (512, 1024):
            photo(size, size).save(scratch / f"{size}.jpg", quality=90)

        per_caption_us = {}
        for name in ("tokenizer", "tokenizer_2"):
            load = statistics.median(tokenize_seconds(scratch / name, scratch / "none.txt")
                                     for _ in range(args.repeat))
            full = statistics.median(tokenize_seconds(scratch / name, scratch / "captions.txt")
                                     for _ in range(args.repeat))
            per_caption_us[name] = 1e6 * max(0.0, full - load) / len(picked)
        decode_ms = {size: statistics.median(decode_ms_per_image(scratch / f"{size}.jpg", args.images)
                                             for _ in range(args.repeat)) for size in (512, 1024)}

    sd15_us = per_caption_us["tokenizer"]
    sdxl_us = per_caption_us["tokenizer"] + per_caption_us["tokenizer_2"]
    rows = []
    for size, ms in decode_ms.items():
        pair_us = 2 * 1000 * ms
        rows.append({"source": f"{size}x{size}", "decode_us_per_pair": pair_us,
                     "sd15_tokenize_us_per_pair": sd15_us, "sd15_share": sd15_us / pair_us,
                     "sdxl_tokenize_us_per_pair": sdxl_us, "sdxl_share": sdxl_us / pair_us})
    result = {"date": dt.date.today().isoformat(), "captions": len(picked), "repeat": args.repeat,
              "loadavg": os.getloadavg(), "per_caption_us": per_caption_us, "decode_ms_per_image": decode_ms,
              "rows": rows}
    print("| source JPEG | decode µs/pair | SD1.5 tokenize µs/pair | share | SDXL tokenize µs/pair | share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['source']} | {r['decode_us_per_pair']:.0f} | {r['sd15_tokenize_us_per_pair']:.0f} | "
              f"{100 * r['sd15_share']:.1f} % | {r['sdxl_tokenize_us_per_pair']:.0f} | {100 * r['sdxl_share']:.1f} % |")
    out = ROOT / "bench" / "results" / f"caption-tokenize-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
