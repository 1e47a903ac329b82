"""dde_train's default thread plan against fixed splits of the CPUs, and against the Python loop.

    .venv/bin/python bench/thread_plan.py [--rounds 2] [--steps 30] [--warmup 12]
        [--scenario NAME ...] [--work DIR] [--out FILE]

The default plan (util/threads.hpp) gives LibTorch every CPU and runs the decode workers at nice
+10; after its first steps the thread tuner (util/thread_tuner.hpp) may move CPUs to the workers,
when their measured demand is worth it and a trial of the fewer threads is faster. A fixed split
sets run.threads (the workers then keep their priority, nothing is tuned). Each scenario trains the
bench's mid-size SD1.5-architecture pipeline (bench/vs_diffusion_dpo.py: 33.8 M-parameter UNet,
method uniform, fp32, micro-batch 2, global batch 4) and runs, in one alternating order per round so
that machine load hits every variant alike:

- dde_train at its defaults (data.workers 2, no run.threads);
- dde_train at fixed splits: workers 1 or 2, run.threads 1 or 2;
- the Python loop of Diffusion-DPO's step (2 DataLoader workers, torch's default threads);
- with --baseline-build DIR, the default plan of that build's dde_train (an earlier commit, built
  with scripts/build.sh into DIR), as the variant `default-baseline`.

Scenarios: `128` trains at 128 px from the bench's own 64-128 px JPEGs (decoding is light);
`decode` trains at 128 px from the same pictures upscaled to 1024-2048 px JPEGs (Pick-a-Pic's
sizes: decoding and resizing are heavy); `decode32` from 2048-4096 px JPEGs (heavier still: the decode
workers' demand passes the thread tuner's floor on this machine). Reported: pairs/s over the steps after --warmup (median
over rounds), the mean data_wait_frac of dde_train, each variant over the default plan and over the
Python loop. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import vs_diffusion_dpo as vs  # noqa: E402

SCENARIOS = {"128": {"resolution": 128, "image_scale": 1}, "decode": {"resolution": 128, "image_scale": 16},
             "decode32": {"resolution": 128, "image_scale": 32}}
# (name, data.workers, run.threads or None for the default plan, extra environment)
DDE_VARIANTS = [("default", 2, None, {}), ("w2-t1", 2, 1, {}), ("w2-t2", 2, 2, {}), ("w1-t1", 1, 1, {}),
                ("w1-t2", 1, 2, {}),
                # the default plan with OpenMP's idle threads sleeping instead of spinning (libgomp)
                ("default-passive", 2, None, {"OMP_WAIT_POLICY": "PASSIVE"})]


def upscaled_parquet(source: Path, out: Path, scale: int) -> Path:
    """The parquet with every image resized `scale` times (bicubic) and saved as JPEG quality 90."""
    import pyarrow.parquet as pq
    from PIL import Image

    if out.is_file():
        return out
    table = pq.read_table(source)

    def grow(data: bytes) -> bytes:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for name in ("jpg_0", "jpg_1"):
        columns[name] = [grow(v) for v in columns[name]]
    import pyarrow as pa

    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=table.schema), out)
    return out


def scenario_paths(work: Path, name: str, rows: int) -> dict:
    """The mid pipeline and exports (shared), and this scenario's shards."""
    paths = vs.prepare(work, "mid", rows)
    scale = SCENARIOS[name]["image_scale"]
    if scale == 1:
        return paths
    import subprocess

    base = work / "mid" / f"scale{scale}"
    parquet = upscaled_parquet(paths["parquet"], base / "pickapic" / "train-00000.parquet", scale)
    shards = base / "shards"
    if not (shards / "index.json").is_file():
        env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
        subprocess.run([sys.executable, "-m", "dde_tools.export_pickapic", "--parquet", str(parquet), "--out",
                        str(shards), "--tokenizer", str(paths["export"] / "tokenizer"), "--pairs-per-shard", "64"],
                       check=True, env=env)
    return {**paths, "parquet": parquet, "shards": shards}


def bench_args(cli: argparse.Namespace, resolution: int, workers: int, build: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        device="cpu", size="mid", resolution=resolution, steps=cli.steps, warmup=cli.warmup,
        global_batch=4, dde_micro_batch=2, dde_precision="fp32", dde_set=[f"data.resolution={resolution}"],
        workers=workers, threads=None, work=cli.work, build=build or cli.build, timeout=1800)


def step_figures(work: Path, tag: str, warmup: int) -> dict:
    """Means over the timed steps of a dde_train run: the wait for data, the decode workers' CPU
    use (cores), and the intra-op threads of its last step (the thread tuner's choice)."""
    steps = [json.loads(x) for x in (work / "runs" / tag / "metrics.jsonl").read_text().splitlines()]
    timed = [s for s in steps if s.get("kind") == "step"][warmup:]
    mean = lambda key: statistics.fmean(s[key] for s in timed) if timed else float("nan")  # noqa: E731
    return {"data_wait_frac": mean("data_wait_frac"), "decode_cpu": mean("decode_cpu"),
            "intra_op_threads": timed[-1]["intra_op_threads"] if timed else None}


def run_scenario(cli: argparse.Namespace, name: str) -> dict:
    resolution = SCENARIOS[name]["resolution"]
    paths = scenario_paths(cli.work, name, cli.rows)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    chosen = [v + (None,) for v in DDE_VARIANTS if not cli.variant or v[0] in cli.variant]
    if cli.baseline_build:  # the default plan of another build (an earlier commit), in the same rounds
        chosen.append(("default-baseline", 2, None, {}, cli.baseline_build))
    runs: dict[str, list[dict]] = {v[0]: [] for v in chosen} | ({} if cli.no_python else {"python": []})
    for k in range(cli.rounds):
        for variant, workers, threads, extra, build in chosen:
            args = bench_args(cli, resolution, workers, build)
            sets = (f"run.threads={threads}",) if threads else ()
            tag = f"{name}-{variant}-{k}"
            r = vs.run_dde(paths, args, tag, env | extra, sets)
            r |= step_figures(cli.work, tag, cli.warmup)
            runs[variant].append(r)
            print(f"bench: {name} round {k}: dde {variant}: "
                  f"{args.global_batch * len(r['step_seconds'][cli.warmup:]) / sum(r['step_seconds'][cli.warmup:]):.3f} "
                  f"pairs/s, wait {r['data_wait_frac']:.3f}, decode {r['decode_cpu']:.3f} CPU, "
                  f"{r['intra_op_threads']} intra-op threads", flush=True)
        if cli.no_python:
            continue
        args = bench_args(cli, resolution, 2)
        runs["python"].append(vs.run_python(paths, args, f"{name}-python-{k}", env))
        print(f"bench: {name} round {k}: python: "
              f"{args.global_batch * len(runs['python'][-1]['step_seconds'][cli.warmup:]) / sum(runs['python'][-1]['step_seconds'][cli.warmup:]):.3f} pairs/s",
              flush=True)
    summary = {}
    for variant, rs in runs.items():
        s = vs.summarize(rs, bench_args(cli, resolution, 2))
        if variant != "python":
            for key in ("data_wait_frac", "decode_cpu"):
                s[key] = statistics.median(r[key] for r in rs)
            s["intra_op_threads"] = [r["intra_op_threads"] for r in rs]
        summary[variant] = s
    default = summary["default"]["pairs_per_s"] if "default" in summary else float("nan")
    python = summary["python"]["pairs_per_s"] if "python" in summary else float("nan")
    for s in summary.values():
        s["over_default"] = s["pairs_per_s"] / default
        s["over_python"] = s["pairs_per_s"] / python
    return {"resolution": resolution, "image_scale": SCENARIOS[name]["image_scale"], "variants": summary,
            "runs": runs}


def table(result: dict) -> str:
    lines = []
    for name, sc in result["scenarios"].items():
        lines += [f"scenario {name}: {sc['resolution']} px, images x{sc['image_scale']}",
                  "| variant | pairs/s | / default | / python | data_wait_frac | decode CPU | intra-op threads "
                  "| peak RSS MiB (tree) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for variant, s in sc["variants"].items():
            own = "data_wait_frac" in s
            figures = (f"{s['data_wait_frac']:.3f} | {s['decode_cpu']:.3f} | "
                       f"{', '.join(str(t) for t in s['intra_op_threads'])}") if own else " | | "
            lines.append(f"| {variant} | {s['pairs_per_s']:.3f} | {s['over_default']:.2f}x | {s['over_python']:.2f}x | "
                         f"{figures} | {s['peak_tree_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    # the default plan's thread tuner decides after its 12th step (util/thread_tuner.hpp): timed
    # steps come after it, as in a run of thousands of steps
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--variant", action="append", choices=[v[0] for v in DDE_VARIANTS],
                        help="only these dde variants (repeatable; default: all)")
    parser.add_argument("--no-python", action="store_true", help="leave the Python loop out")
    parser.add_argument("--baseline-build", type=Path,
                        help="also run the default plan of this build folder's dde_train (variant default-baseline)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_thread_plan")
    parser.add_argument("--build", type=Path, default=Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")))
    parser.add_argument("--out", type=Path)
    cli = parser.parse_args(argv)
    if not (cli.build / "dde_train").is_file():
        raise SystemExit(f"bench: {cli.build}/dde_train not built: run scripts/build.sh first")
    if cli.baseline_build and not (cli.baseline_build / "dde_train").is_file():
        raise SystemExit(f"bench: {cli.baseline_build}/dde_train not built")
    load_before = os.getloadavg()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": vs.git_revision(),
        "command": " ".join(["python", "bench/thread_plan.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before},
        "scenarios": {name: run_scenario(cli, name) for name in (cli.scenario or list(SCENARIOS))},
    }
    result["machine"]["loadavg_after"] = os.getloadavg()
    out = cli.out or ROOT / "bench" / "results" / f"thread_plan-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
