"""Peak memory and speed of dde_tools.relabel: does memory stay flat as the input grows?

    .venv/bin/python bench/relabel_memory.py [--rows 1000 4000] [--side 512] [--batch-size 64]

Makes synthetic Pick-a-Pic files (scripts/dde_tools/fixtures.py, row groups of 256, the images
re-encoded at --side x --side pixels so that the JPEG bytes dominate, as in Pick-a-Pic), builds the
tiny HPS annotator (annotator_fixtures) and runs `python -m dde_tools.relabel` on each file with
--batch-size, then once on the largest file with a record batch as large as the file. Reports the
child's peak RSS (ru_maxrss from wait4(2), what /usr/bin/time -v prints), wall time and pairs/s,
as a markdown table and as JSON in bench/results/relabel-<date>.json. The tiny annotator makes the
scoring cheap, so the figures are about the streaming, not about a real annotator's speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from dde_tools import annotator_fixtures, fixtures  # noqa: E402


def enlarge(jpeg: bytes | None, side: int, rng: np.random.Generator) -> bytes | None:
    """The image resized to side x side with mild noise, as a quality-90 JPEG."""
    if not jpeg:
        return jpeg
    try:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((side, side))
    except OSError:
        return jpeg  # the planted undecodable ones stay undecodable
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_input(path: Path, rows: int, side: int) -> int:
    """A synthetic Pick-a-Pic file of `rows` rows with side-pixel images; returns its size in bytes."""
    small = path.with_suffix(".small.parquet")
    fixtures.make_pickapic_parquet(small, rows=rows, seed=0, bad_rows=True)
    rng = np.random.default_rng(0)
    source = pq.ParquetFile(small)
    with pq.ParquetWriter(path, source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=256):
            table = pa.Table.from_batches([batch])
            for name in ("jpg_0", "jpg_1"):
                big = [enlarge(v, side, rng) for v in table.column(name).to_pylist()]
                table = table.set_column(table.column_names.index(name), name, pa.array(big, pa.binary()))
            writer.write_table(table)
    small.unlink()
    return path.stat().st_size


def run_relabel(source: Path, out: Path, flags: list[str], batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "dde_tools.relabel", "--parquet", str(source), "--out", str(out),
           "--batch-size", str(batch_size), "--device", "cpu", *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"relabel failed: {proc.stderr.read()}")
    rows = json.loads((out / "relabel_summary.json").read_text())["rows"]
    return {"peak_rss_mib": usage.ru_maxrss / 1024.0, "wall_s": wall, "pairs_per_s": rows / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="relabel --batch-size (default 64)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = annotator_fixtures.build(tmp / "annotators")
        flags = ["--hps-checkpoint", str(paths["hps"]), "--hps-arch", annotator_fixtures.TINY_ARCH,
                 "--open-clip-config", str(paths["open_clip_config"])]
        runs = [(rows, args.batch_size) for rows in args.rows] + [(max(args.rows), max(args.rows))]
        sizes = {rows: make_input(tmp / f"rows{rows}.parquet", rows, args.side) for rows in args.rows}
        for rows, batch in runs:
            result = run_relabel(tmp / f"rows{rows}.parquet", tmp / f"out{rows}-{batch}", flags, batch)
            results.append({"rows": rows, "input_mib": sizes[rows] / 2**20, "batch_size": batch, **result})
    print("| rows | input MiB | --batch-size | peak RSS MiB | wall s | pairs/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']} | {r['input_mib']:.0f} | {r['batch_size']} | {r['peak_rss_mib']:.0f} | "
              f"{r['wall_s']:.1f} | {r['pairs_per_s']:.1f} |")
    first = results[0]["peak_rss_mib"]
    print("peak RSS relative to the first row: " + ", ".join(f"{r['peak_rss_mib'] / first:.2f}x" for r in results))
    out = ROOT / "bench" / "results" / f"relabel-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "side": args.side, "results": results,
                               "load_avg_after": os.getloadavg()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
