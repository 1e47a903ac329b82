"""Shuffle quality of export_pickapic: distinct prompts and users per 2048-pair batch, with and without
the export's shuffle, on a synthetic prompt-ordered Pick-a-Pic parquet.

    PYTHONPATH=scripts .venv/bin/python bench/shuffle_quality.py [--rows 16384] [--batch 2048]

Pick-a-Pic rows come grouped: a user writes a prompt and ranks several pairs for it, then the next
prompt. The synthetic file has that shape (pairs per prompt and prompts per user geometric, means
--pairs-per-prompt and --prompts-per-user), in that order. Each variant is exported by the CLI in a
subprocess (wall and CPU time, peak RSS as VmHWM); the shards are read back in order, cut into
--batch consecutive pairs (what a loader that reads shards in order puts in one step), and the
distinct prompts and users per batch are counted. "ideal" is a numpy permutation of the same rows,
computed here, independently of the exporter. Writes bench/results/<date>-shuffle.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from dde_tools import fixtures  # noqa: E402


def prompt_ordered_parquet(path: Path, rows: int, pairs_per_prompt: float, prompts_per_user: float,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Write the file; return the prompt id and user id of each row."""
    rng = np.random.default_rng(seed)
    prompt_ids, user_ids, prompt, user = [], [], 0, 0
    while len(prompt_ids) < rows:
        for _ in range(rng.geometric(1 / prompts_per_user)):
            count = rng.geometric(1 / pairs_per_prompt)
            prompt_ids += [prompt] * count
            user_ids += [user] * count
            prompt += 1
        user += 1
    prompt_ids, user_ids = np.array(prompt_ids[:rows]), np.array(user_ids[:rows])
    pool = [fixtures.draw_jpeg(rng) for _ in range(64)]  # 64-128 px JPEGs, reused
    table = []
    for i in range(rows):
        uids = [str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "little"))) for _ in range(2)]
        label_0 = float(rng.integers(0, 2))
        table.append({
            "caption": f"prompt {prompt_ids[i]}: a scene",
            "image_0_uid": uids[0], "image_1_uid": uids[1],
            "jpg_0": pool[int(rng.integers(0, 64))], "jpg_1": pool[int(rng.integers(0, 64))],
            "label_0": label_0, "label_1": 1.0 - label_0, "ranking_id": i, "user_id": int(user_ids[i]),
        })
    schema = pa.schema([f for f in fixtures.PICKAPIC_SCHEMA if f.name in table[0]])
    pq.write_table(pa.Table.from_pylist(table, schema=schema), path, row_group_size=1024)
    return prompt_ids, user_ids


# Runs the CLI module and prints its VmHWM at exit: the peak RSS of this process image only
# (wait4's ru_maxrss would include the pages a fork copied from this bench, torch included).
CHILD = """
import atexit, re, runpy, sys
def peak():
    status = open("/proc/self/status").read()
    print("VmHWM_kB", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), file=sys.stderr)
atexit.register(peak)
sys.argv = ["export_pickapic", *sys.argv[1:]]
runpy.run_module("dde_tools.export_pickapic", run_name="__main__")
"""


def export(parquet: Path, out: Path, extra: list[str]) -> dict:
    """Run the CLI; return its wall time, peak RSS and the source row of each pair in shard order."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), OMP_NUM_THREADS="1")
    start, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", CHILD, "--parquet", str(parquet), "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, check=False)
    seconds, cpu_after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({proc.returncode}): {extra}\n{proc.stderr}")
    peak_kib = int(proc.stderr.split("VmHWM_kB")[1].split()[0])
    index = json.loads((out / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    rows.append(int(json.loads(tar.extractfile(member).read())["source"].split(":")[1]))
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_kib / 1024, "rows": rows, "shuffle": index["shuffle"],
            "summary": proc.stdout.strip()}


def per_batch(rows: list[int], ids: np.ndarray, batch: int) -> list[int]:
    """Distinct ids in each full batch of consecutive pairs."""
    order = ids[np.array(rows)]
    return [len(set(order[i : i + batch].tolist())) for i in range(0, len(order) - batch + 1, batch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--pairs-per-prompt", type=float, default=4.0)
    parser.add_argument("--prompts-per-user", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = {"no shuffle": ["--no-shuffle"], "shuffle (1 bucket)": [],
                "shuffle (1 MiB buckets)": ["--shuffle-memory-mb", "1"]}
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp, "ordered.parquet")
        prompts, users = prompt_ordered_parquet(parquet, args.rows, args.pairs_per_prompt, args.prompts_per_user,
                                                args.seed)
        results = {name: export(parquet, Path(tmp, f"out{i}"), extra) for i, (name, extra) in enumerate(variants.items())}
    results["ideal (numpy permutation)"] = {"rows": np.random.default_rng(1).permutation(args.rows).tolist()}
    print(f"{args.rows} rows, {len(set(prompts.tolist()))} prompts, {len(set(users.tolist()))} users; "
          f"batches of {args.batch} consecutive pairs")
    print("| order | buckets | prompts/batch mean (min) | users/batch mean (min) | export wall s | CPU s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    report = {"args": vars(args), "variants": {}}
    for name, result in results.items():
        p, u = per_batch(result["rows"], prompts, args.batch), per_batch(result["rows"], users, args.batch)
        timing = (f"{result['seconds']:.1f} | {result['cpu_seconds']:.1f} | {result['peak_rss_mib']:.0f}"
                  if "seconds" in result else "- | - | -")
        buckets = (result.get("shuffle") or {}).get("buckets", "-")
        print(f"| {name} | {buckets} | {np.mean(p):.0f} ({min(p)}) | {np.mean(u):.0f} ({min(u)}) | {timing} |")
        report["variants"][name] = {"prompts_per_batch": p, "users_per_batch": u,
                                    **{k: v for k, v in result.items() if k != "rows"}}
    out = ROOT / "bench" / "results" / f"{datetime.date.today().isoformat()}-shuffle.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
