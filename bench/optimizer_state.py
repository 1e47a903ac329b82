"""Optimizer-state memory per rank and step time: AdamW vs Adafactor, unsharded vs ZeRO-1
(dist.shard_optimizer), on 2 Gloo ranks with the tiny SD1.5 fixture.

    .venv/bin/python bench/optimizer_state.py [--steps 10] [--warmup 3]

The state a rank holds is read from the checkpoint it writes at the last step: unsharded, every
rank holds all of training_state.safetensors (minus correction.E); sharded, rank r holds its
optimizer-rank-r.safetensors. Step time is the mean of global_batch / pairs_per_s over the steps
after --warmup. Prints a markdown table with ratios to "adamw, unsharded". Not a test: the step
times depend on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(binary: Path, fixtures: Path, out: Path, steps: int, sets: list[str]) -> None:
    port = free_port()
    common = [f"model.manifest={fixtures / 'export/sd15/manifest.json'}",
              f"data.index={fixtures / 'shards/sd15/index.json'}", f"run.output_dir={out}",
              f"train.max_steps={steps}", f"checkpoint.every={steps}", "logging.per_sample=false",
              "logging.progress=false", *sets]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [str(binary), "--config", str(ROOT / "configs/tiny_dde.yaml")]
        for s in common:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise SystemExit(f"optimizer_state: dde_train exited {p.returncode}:\n{err[-3000:]}")


def state_bytes(ckpt: Path, sharded: bool) -> list[int]:
    if sharded:
        return [sum(t.nbytes for t in load_file(str(f)).values())
                for f in sorted(ckpt.glob("optimizer-rank-*.safetensors"))]
    whole = load_file(str(ckpt / "training_state.safetensors"))
    return [sum(t.nbytes for k, t in whole.items() if k != "correction.E")] * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    binary = Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")) / "dde_train"
    fixtures = Path(os.environ.get("DDE_FIXTURES_DIR", ROOT / "fixtures"))
    print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("adamw", "adafactor"):
            for sharded in (False, True):
                out = Path(tmp) / f"{name}-{sharded}"
                run(binary, fixtures, out, args.steps,
                    [f"optim.name={name}", f"dist.shard_optimizer={'true' if sharded else 'false'}"])
                ckpt = out / "checkpoints" / f"step-{args.steps:08d}"
                per_rank = state_bytes(ckpt, sharded)
                steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                times = [4 / s["pairs_per_s"] for s in steps if s.get("kind") == "step"][args.warmup:]
                rows.append((name, sharded, per_rank, sum(times) / len(times)))
    base_bytes, base_time = max(rows[0][2]), rows[0][3]
    print("| optimizer | sharded | state bytes rank 0 / rank 1 | max per rank vs adamw unsharded | step ms "
          "| step time vs adamw unsharded |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, sharded, per_rank, t in rows:
        print(f"| {name} | {sharded} | {per_rank[0]} / {per_rank[1]} | {max(per_rank) / base_bytes:.3f} "
              f"| {1000 * t:.1f} | {t / base_time:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
