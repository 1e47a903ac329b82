"""How much bf16 autocast perturbs the per-pair z where Delta is formed, at t near 999.

The same weights, pairs, t and noise are scored in fp32, in bf16 with the output head in fp32
(train.fp32_output_head: true, the default) and in bf16 with it under autocast: a tiny run trains
in fp32 to a checkpoint (so policy != reference), then three copies resume it for one step, each
with one precision, and the step's per-pair z are compared with the fp32 ones.

    .venv/bin/python bench/bf16_delta_precision.py [--family sd15] [--out bench/results/...json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, family: str, sets: list[str], resume: bool = False) -> None:
    config = "tiny_dde.yaml" if family == "sd15" else "tiny_sdxl_dde.yaml"
    cmd = [str(ROOT / "build" / "dde_train"), "--config", str(ROOT / "configs" / config)]
    base = [f"run.output_dir={out}", "data.eval_index=", "logging.per_sample=true", "optim.warmup_steps=0",
            "method.name=dde", "method.t_lo=990", "method.t_hi=1000", "train.global_batch=16",
            "train.micro_batch=8", "checkpoint.every=1", "optim.lr=1e-3"]
    for s in base + sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])


def z_of(run_dir: Path, step: int) -> np.ndarray:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = sorted((r for r in recs if r.get("kind") == "pair" and r["step"] == step), key=lambda r: r["pair_id"])
    return np.array([r["z"] for r in pairs])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        run(base, args.family, ["train.max_steps=3"])
        variants = {"fp32": ["train.precision=fp32"],
                    "bf16, fp32 output head": ["train.precision=bf16", "train.fp32_output_head=true"],
                    "bf16, bf16 output head": ["train.precision=bf16", "train.fp32_output_head=false"]}
        z = {}
        for name, sets in variants.items():
            d = Path(tmp) / name.replace(" ", "_").replace(",", "")
            shutil.copytree(base, d)
            run(d, args.family, sets + ["train.max_steps=4"], resume=True)
            z[name] = z_of(d, 4)
    ref = z["fp32"]
    result = {"family": args.family, "t_window": [990, 1000], "pairs": int(ref.size),
              "z_fp32_abs_mean": float(np.abs(ref).mean())}
    for name in list(variants)[1:]:
        err = np.abs(z[name] - ref)
        result[name] = {"z_abs_err_mean": float(err.mean()), "z_abs_err_max": float(err.max()),
                        "z_rel_err_median": float(np.median(err / np.maximum(np.abs(ref), 1e-12)))}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
