"""Training throughput of dde_train on the tiny fixtures: pairs/s, data wait, peak RSS.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--warmup 5] [--repeat 3] [--threads N]
        [--families sd15 sdxl] [--variants batch4 batch16] [--set key=value ...]

Runs the built binary (it builds nothing: run scripts/build.sh first) on the tiny SD1.5 and SDXL
fixtures (scripts/prepare_tiny.sh), once with configs/tiny_dde.yaml's batch (4 pairs = 2 x 2
accumulation) and once with a bigger one (16 pairs = 8 x 2), and reads its metrics.jsonl:

- pairs/s: pairs of the measured steps over their summed step time (the first --warmup steps,
  which include TorchScript's profiling runs, are left out);
- data wait: the share of that time the loop waited for a batch (time-weighted data_wait_frac);
- peak RSS: the child's ru_maxrss from wait4(2) (what /usr/bin/time -v reports).

With --repeat N every row is run N times and shows the median run by pairs/s (all runs are in
the JSON). Prints a markdown table and writes it as JSON to bench/results/<date>.json. Not a
test: the numbers depend on the machine and its load, which the JSON records (os.getloadavg()).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"batch4": ["train.global_batch=4", "train.micro_batch=2"],
            "batch16": ["train.global_batch=16", "train.micro_batch=8"]}


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_once(binary: Path, config: Path, sets: list[str], run_dir: Path, timeout: float, env: dict) -> dict:
    """Runs dde_train to completion; returns wall time, peak RSS and the step records."""
    cmd = [str(binary), "--config", str(config)]
    for s in sets + [f"run.output_dir={run_dir}"]:
        cmd += ["--set", s]
    start = time.monotonic()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"train_throughput: {' '.join(cmd)} ran past {timeout:.0f} s")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        raise SystemExit(f"train_throughput: dde_train exited {proc.returncode}:\n{tail}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "step"]
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0, "steps": steps}


def summarize(steps: list[dict], warmup: int, global_batch: int) -> dict:
    measured = steps[warmup:]
    if not measured:
        raise SystemExit(f"train_throughput: {len(steps)} steps, none left after --warmup {warmup}")
    seconds = [global_batch / s["pairs_per_s"] for s in measured]
    total = sum(seconds)
    return {
        "measured_steps": len(measured),
        "pairs_per_s": global_batch * len(measured) / total,
        "step_ms": 1000.0 * total / len(measured),
        "data_wait_frac": sum(s["data_wait_frac"] * t for s, t in zip(measured, seconds)) / total,
        "first_step_s": global_batch / steps[0]["pairs_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")))
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("DDE_FIXTURES_DIR", ROOT / "fixtures")))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_dde.yaml")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rates")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra dde_train overrides, e.g. --set method.name=uniform --set data.workers=1")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the row shows the median by pairs/s")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for dde_train (default: inherited; on a busy machine 1 avoids "
                             "OpenMP threads spinning against other processes)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)

    binary = args.build_dir / "dde_train"
    if not binary.is_file():
        raise SystemExit(f"train_throughput: {binary} not built: run scripts/build.sh (this script builds nothing)")
    for family in args.families:
        for need in (args.fixtures / "export" / family / "manifest.json",
                     args.fixtures / "shards" / family / "index.json"):
            if not need.is_file():
                raise SystemExit(f"train_throughput: {need} missing: run scripts/prepare_tiny.sh")

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dde_bench_") as tmp:
        for family in args.families:
            for variant in args.variants:
                sets = [
                    f"model.manifest={args.fixtures / 'export' / family / 'manifest.json'}",
                    f"data.index={args.fixtures / 'shards' / family / 'index.json'}",
                    f"train.max_steps={args.steps}", f"checkpoint.every={args.steps}",
                    "logging.per_sample=false", "logging.progress=false",
                ] + VARIANTS[variant] + args.sets
                global_batch = int(next(s for s in reversed(sets) if s.startswith("train.global_batch=")).split("=")[1])
                runs = []
                for repeat in range(args.repeat):
                    load = os.getloadavg()[0]
                    result = run_once(binary, args.config, sets, Path(tmp) / f"{family}_{variant}_{repeat}",
                                      args.timeout, env)
                    runs.append({"load_1min_before": load, "wall_s": result["wall_s"],
                                 "peak_rss_mib": result["peak_rss_mib"],
                                 **summarize(result["steps"], args.warmup, global_batch)})
                median = sorted(runs, key=lambda r: r["pairs_per_s"])[(len(runs) - 1) // 2]
                row = {"family": family, "variant": variant, "global_batch": global_batch, **median,
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": runs}
                rows.append(row)
                print(f"  {family} {variant}: {row['pairs_per_s']:.1f} pairs/s", file=sys.stderr)

    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": git_revision(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_before": load_before,
                 "load_avg_after": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, "bench/train_throughput.py", *(argv or sys.argv[1:])]),
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "steps": args.steps, "warmup": args.warmup, "extra_sets": args.sets,
        "omp_num_threads": env.get("OMP_NUM_THREADS"), "repeat": args.repeat,
        "rows": rows,
    }
    header = ("| family | variant | batch | pairs/s | step ms | data wait | peak RSS MiB | first step s | wall s "
              "| load |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['family']} | {r['variant']} | {r['global_batch']} | {r['pairs_per_s']:.1f} | {r['step_ms']:.0f} "
              f"| {100 * r['data_wait_frac']:.1f}% | {r['peak_rss_mib']:.0f} | {r['first_step_s']:.2f} "
              f"| {r['wall_s']:.1f} | {r['load_1min_before']:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    stem = dt.date.today().isoformat()
    path = args.results / f"{stem}.json"
    n = 2
    while path.exists():
        path = args.results / f"{stem}-{n}.json"
        n += 1
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
