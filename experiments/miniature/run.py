"""The miniature world experiment, end to end (docs/miniature.md).

    python -m miniature.run [--smoke] [--out DIR] [--bin build/dde_train] [all|prepare|report]

(PYTHONPATH=scripts:experiments; `bash experiments/miniature/run.sh` sets it.) Stages, each
skipped when its output is already there, so an interrupted run continues where it stopped:

 1. held-out prompts (never trained on);
 2. a small VAE trained on world images; the annotator's score of reconstructions vs originals;
 3. the initial pipeline (fixture tokenizer and text encoder, random tiny UNet, the VAE),
    exported to TorchScript by dde_tools.export_models;
 4. imperfect pretraining data (a fraction of captions corrupted) as Pick-a-Pic parquet ->
    dde_tools.export_pickapic shards;
 5. the base: `dde_train --method sft` from the initial UNet, exported back to diffusers
    (dde_tools.export_diffusers) and again to TorchScript (the policy and reference of stage 8);
 6. pairs: two base samples per prompt, labelled by the annotator with dde_tools.relabel
    (higher wins, a difference under the margin is a tie), parquet -> shards;
 7. the base sampled on the held-out prompts;
 8. every method and window, at every seed, trained from the base with the same settings,
    exported to diffusers, sampled on the held-out prompts and scored; the results table is
    rewritten after each run, so a partial run still yields one;
 9. report: results.json, results.md, figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dde_tools import eval_report, evaluate, export_diffusers, export_models, export_pickapic, relabel
from dde_tools.export_models import quiet_torchscript
from miniature import pipeline as pipe_io
from miniature import report, vae as vae_io, world
from miniature.annotator import WorldAnnotator, foreground_fraction, quadrant_scores

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
METHODS = ("uniform", "discounted", "dde", "dde_single", "dde_step", "sft")
WINDOWS = ((200, 700), (0, 100), (300, 400), (500, 600), (700, 800), (900, 1000))


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    heldout_prompts: int = 100
    images_per_prompt: int = 2
    vae_images: int = 4000
    vae_steps: int = 800
    vae_batch: int = 32
    recon_images: int = 500
    sft_rows: int = 8000
    caption_noise: float = 0.3  # fraction of pretraining captions with one attribute changed
    base_steps: int = 800
    pair_prompts: int = 1500
    sample_steps: int = 20  # DDIM
    guidance: float = 3.0
    tie_margin: float = 0.01  # annotator units
    steps: int = 120  # preference optimizer steps, every method and window
    batch: int = 32  # pairs per preference step
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    windows: tuple[tuple[int, int], ...] = WINDOWS
    window_method: str = "uniform"
    parallel: int = 2


FULL = Settings()
SMOKE = replace(FULL, heldout_prompts=6, images_per_prompt=1, vae_images=256, vae_steps=20, recon_images=32,
                sft_rows=64, base_steps=4, pair_prompts=24, sample_steps=3, steps=3, batch=8, seeds=(0,),
                windows=((200, 700),))


def window_name(window: tuple[int, int], method: str) -> str:
    return f"{method}_t{window[0]}-{window[1]}"


def variants(settings: Settings) -> dict[str, list[str]]:
    """Variant name -> its dde_train --set overrides."""
    out = {m: [f"method.name={m}"] for m in settings.methods}
    for lo, hi in settings.windows:
        out[window_name((lo, hi), settings.window_method)] = [
            f"method.name={settings.window_method}", f"method.t_lo={lo}", f"method.t_hi={hi}"]
    return out


def log(message: str) -> None:
    print(f"[miniature {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- stages 1-4: prompts, VAE, initial pipeline, pretraining data -------------------------------


def heldout_stage(out: Path, s: Settings) -> list[str]:
    path = out / "heldout_prompts.txt"
    if not path.is_file():
        path.write_text("\n".join(world.prompts(s.seed + 1, s.heldout_prompts)) + "\n", encoding="utf-8")
    return path.read_text(encoding="utf-8").splitlines()


def vae_stage(out: Path, s: Settings) -> dict:
    """Train the VAE and score its reconstructions of unseen scenes against the originals."""
    folder, report_path = out / "vae", out / "vae_report.json"
    if report_path.is_file():
        return json.loads(report_path.read_text())
    rng = np.random.default_rng(s.seed + 2)
    images = vae_io.to_tensor([world.render(world.sample_scene(rng)) for _ in range(s.vae_images)])
    model = vae_io.train_vae(images, s.vae_steps, s.vae_batch, s.seed)
    model.save_pretrained(folder)
    rng = np.random.default_rng(s.seed + 3)
    scenes = [world.sample_scene(rng) for _ in range(s.recon_images)]
    originals = [world.render(scene) for scene in scenes]
    x = vae_io.to_tensor(originals)
    reconstruction = vae_io.reconstruct(model, x)
    captions = [world.caption(scene) for scene in scenes]
    annotator = WorldAnnotator()
    original_scores = annotator.score(originals, captions)
    recon_scores = annotator.score(vae_io.to_images(reconstruction), captions)
    result = {"images": len(scenes), "original_mean": float(original_scores.mean()),
              "reconstruction_mean": float(recon_scores.mean()),
              "reconstruction_min": float(recon_scores.min()),
              "mean_abs_score_change": float(np.abs(recon_scores - original_scores).mean()),
              "pixel_mse": float(((reconstruction.clamp(-1, 1) - x) ** 2).mean()),
              "scaling_factor": float(model.config.scaling_factor)}
    report.write_json(report_path, result)
    log(f"vae: {result}")
    return result


def init_stage(out: Path, s: Settings) -> Path:
    manifest = out / "init" / "export" / "manifest.json"
    if not manifest.is_file():
        vae = vae_io.AutoencoderKL.from_pretrained(out / "vae")
        source = pipe_io.make_pipeline(vae, ROOT / "fixtures" / "source" / "sd15", out / "init" / "pipeline", s.seed)
        with quiet_torchscript():
            export_models.export_pipeline(source, out / "init" / "export")
    return manifest


def sft_rows(s: Settings, exclude: set[str]) -> list[dict]:
    """Pretraining rows: winner = a scene, caption = its caption, or with probability
    caption_noise the caption of the scene with one attribute changed; loser = another scene."""
    rng = np.random.default_rng(s.seed + 4)
    rows = []
    while len(rows) < s.sft_rows:
        scene = world.sample_scene(rng)
        text = world.caption(scene)
        if text in exclude:
            continue
        if rng.random() < s.caption_noise:
            text = world.caption(world.corrupt(scene, rng))
        other = world.render(world.sample_scene(rng))
        rows.append(pipe_io.pickapic_row(len(rows), text, pipe_io.png(world.render(scene)), pipe_io.png(other), 1.0))
    return rows


def shards(parquet: Path, out: Path, tokenizer: Path) -> Path:
    index = out / "index.json"
    if not index.is_file():
        result = export_pickapic.export([parquet], out, [tokenizer], pairs_per_shard=512)
        log(export_pickapic.summary(result, out))
    return index


def sft_data_stage(out: Path, s: Settings, heldout: list[str]) -> Path:
    parquet = out / "sft" / "train.parquet"
    if not parquet.is_file():
        pipe_io.write_parquet(sft_rows(s, set(heldout)), parquet)
    return shards(parquet, out / "sft" / "shards", out / "init" / "export" / "tokenizer")


# --- stage 5: the base --------------------------------------------------------------------------


def train(binary: Path, config: str, run_dir: Path, sets: list[str]) -> Path:
    """Run dde_train unless run_dir already holds its final checkpoint; return that checkpoint."""
    steps = next(int(v.split("=")[1]) for v in sets if v.startswith("train.max_steps="))
    checkpoint = run_dir / "checkpoints" / f"step-{steps:08d}"
    if (checkpoint / "COMPLETE").is_file():
        return checkpoint
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [str(binary), "--config", str(HERE / config), "--set", f"run.output_dir={run_dir}"]
    for value in sets:
        command += ["--set", value]
    with open(run_dir / "stdout.log", "w") as stdout:
        result = subprocess.run(command, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0 or not (checkpoint / "COMPLETE").is_file():
        raise RuntimeError(f"dde_train failed (exit {result.returncode}): see {run_dir / 'stdout.log'}")
    return checkpoint


def base_stage(out: Path, s: Settings, binary: Path) -> Path:
    manifest = out / "base" / "export" / "manifest.json"
    if manifest.is_file():
        return manifest
    checkpoint = train(binary, "base_sft.yaml", out / "base" / "run", [
        f"model.manifest={out / 'init' / 'export' / 'manifest.json'}",
        f"data.index={out / 'sft' / 'shards' / 'index.json'}", f"run.seed={s.seed}",
        f"train.max_steps={s.base_steps}", f"checkpoint.every={s.base_steps}"])
    export_diffusers.export(checkpoint, out / "base" / "pipeline", out / "init" / "pipeline")
    with quiet_torchscript():
        export_models.export_pipeline(out / "base" / "pipeline", out / "base" / "export")
    return manifest


# --- sampling and scoring -----------------------------------------------------------------------


def sample(pipeline_dir: Path, name: str, prompts: list[str], images_per_prompt: int, folder: Path,
           s: Settings, seed: int) -> list[dict]:
    """dde_tools.evaluate.sample (image j of prompt i from seed + 1000 i + j), scored by the annotator."""
    args = argparse.Namespace(out=folder, images_per_prompt=images_per_prompt, sample_batch_size=64, seed=seed,
                              steps=s.sample_steps, height=None, width=None)
    entry = evaluate.Pipeline(name, pipeline_dir, "StableDiffusionPipeline", s.guidance)
    records = evaluate.sample(entry, prompts, args, torch.device("cpu"), torch.float32)
    images = [Image.open(folder / r["image"]).convert("RGB") for r in records]
    for record, value in zip(records, WorldAnnotator().score(images, [r["prompt"] for r in records])):
        record["world"] = float(value)
    return records


def score_file(records: list[dict], path: Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    table = eval_report.score_table(records, name, "world", shape)
    report.write_json(path, {"name": name, "scores": table.tolist()})
    return table


def read_scores(path: Path) -> np.ndarray:
    return np.asarray(json.loads(path.read_text())["scores"], dtype=np.float64)


# --- stage 6: pairs -----------------------------------------------------------------------------


def pairs_stage(out: Path, s: Settings, heldout: list[str]) -> Path:
    """Two base samples per prompt, relabelled by the annotator, exported to shards."""
    parquet = out / "pairs" / "train.parquet"
    if not parquet.is_file():
        prompts = world.prompts(s.seed + 5, s.pair_prompts, exclude=set(heldout))
        folder = out / "pairs" / "samples"
        records = sample(out / "base" / "pipeline", "base", prompts, 2, folder, s, seed=10_000_000)
        by_key = {(r["prompt_index"], r["image_index"]): r for r in records}
        rows = [pipe_io.pickapic_row(i, p, (folder / by_key[(i, 0)]["image"]).read_bytes(),
                                     (folder / by_key[(i, 1)]["image"]).read_bytes(), 0.5)
                for i, p in enumerate(prompts)]
        table = pa.Table.from_pylist(rows, schema=pipe_io.fixtures.PICKAPIC_SCHEMA)
        counts = relabel.Counts()
        table = relabel.relabel_table(table, WorldAnnotator(), s.tie_margin, 256, counts)
        parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, parquet, row_group_size=512)
        scores = np.asarray([r["world"] for r in records])
        gaps = np.abs(np.asarray(table.column("score_0")) - np.asarray(table.column("score_1")))
        report.write_json(out / "pairs" / "stats.json", {
            "pairs": len(rows), "labels": counts.new_labels, "tie_margin": s.tie_margin,
            "base_sample_score_mean": float(scores.mean()), "base_sample_score_std": float(scores.std()),
            "base_sample_score_percentiles_5_50_95": np.percentile(scores, [5, 50, 95]).tolist(),
            "pair_gap_mean": float(gaps.mean()), "pair_gap_median": float(np.median(gaps))})
        shutil.rmtree(folder)
    return shards(parquet, out / "pairs" / "shards", out / "base" / "export" / "tokenizer")


# --- stages 7-8: evaluation and the preference runs ---------------------------------------------


def base_eval_stage(out: Path, s: Settings, heldout: list[str]) -> np.ndarray:
    path = out / "eval" / "base.json"
    if not path.is_file():
        records = sample(out / "base" / "pipeline", "base", heldout, s.images_per_prompt, out / "eval", s, seed=0)
        score_file(records, path, "base", (len(heldout), s.images_per_prompt))
    return read_scores(path)


def run_variant(out: Path, s: Settings, binary: Path, name: str, sets: list[str], seed: int,
                heldout: list[str], eval_lock: threading.Lock) -> Path:
    """Train one variant at one seed from the base, export it, sample the held-out prompts, score."""
    run_dir = out / "runs" / name / f"seed{seed}"
    result = run_dir / "eval.json"
    if result.is_file():
        return result
    start = time.perf_counter()
    checkpoint = train(binary, "preference.yaml", run_dir, [
        f"model.manifest={out / 'base' / 'export' / 'manifest.json'}",
        f"data.index={out / 'pairs' / 'shards' / 'index.json'}", f"run.seed={seed}",
        f"train.max_steps={s.steps}", f"checkpoint.every={s.steps}", f"train.global_batch={s.batch}",
        f"train.micro_batch={s.batch}", *sets])
    trained = time.perf_counter() - start
    with eval_lock:  # one in-process sampler at a time: two heavy processes at most
        pipeline_dir = export_diffusers.export(checkpoint, run_dir / "pipeline", out / "base" / "pipeline")
        model = f"{name}-s{seed}"
        records = sample(pipeline_dir, model, heldout, s.images_per_prompt, out / "eval", s, seed=0)
        score_file(records, result, model, (len(heldout), s.images_per_prompt))
        shutil.rmtree(pipeline_dir)
    log(f"{name} seed {seed}: trained in {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    return result


def runs_stage(out: Path, s: Settings, binary: Path, heldout: list[str]) -> None:
    """Every (seed, variant), seed-major so that a partial run covers every variant early."""
    jobs = [(name, sets, seed) for seed in s.seeds for name, sets in variants(s).items()]
    lock, table_lock = threading.Lock(), threading.Lock()

    def job(name: str, sets: list[str], seed: int) -> None:
        run_variant(out, s, binary, name, sets, seed, heldout, lock)
        with table_lock:
            write_report(out, s, figures=False)

    with ThreadPoolExecutor(max_workers=s.parallel) as pool:
        for future in [pool.submit(job, *j) for j in jobs]:
            future.result()


# --- stage 9: report ----------------------------------------------------------------------------


def finished(out: Path, s: Settings) -> dict[str, list[Path]]:
    """Variant -> run directories whose evaluation is done."""
    return {name: [out / "runs" / name / f"seed{seed}" for seed in s.seeds
                   if (out / "runs" / name / f"seed{seed}" / "eval.json").is_file()] for name in variants(s)}


def samples_grid(out: Path, names: list[str], prompts: int, path: Path) -> None:
    """Image 0 of the first held-out prompts: the base, then seed 0 of each variant."""
    models = ["base"] + [f"{n}-s0" for n in names if (out / "eval" / "images" / f"{n}-s0").is_dir()]
    cells = [[Image.open(out / "eval" / "images" / m / f"{i:05d}_00.png") for m in models] for i in range(prompts)]
    labels = [m.removesuffix("-s0").replace("uniform_t", "t").replace("dde_", "") for m in models]
    eval_report.image_grid(cells, labels, 72).quantize(colors=128).save(path, optimize=True)


def diagnostics_column(out: Path, runs: dict[str, list[Path]], prompts: list[str]) -> dict[str, str]:
    """Per variant and the base, over its held-out images: the mean score of the quadrants the
    caption names, of those it leaves empty, and the mean foreground fraction: "N / E / F"."""
    models = {"base": ["base"]} | {n: [f"{n}-s{d.name[4:]}" for d in dirs] for n, dirs in runs.items() if dirs}
    column = {}
    for name, folders in models.items():
        named, empty, fractions = [], [], []
        for path in [f for m in folders for f in sorted((out / "eval" / "images" / m).glob("*.png"))]:
            image = Image.open(path)
            parts = quadrant_scores(image, prompts[int(path.stem.split("_")[0])])
            named += parts[0]
            empty += parts[1]
            fractions.append(foreground_fraction(image))
        column[name] = f"{np.mean(named):.3f} / {np.mean(empty):.3f} / {np.mean(fractions):.3f}"
    return column


def world_foreground(seed: int, count: int = 500) -> float:
    """Mean foreground fraction of rendered world scenes: what a perfect model would draw."""
    rng = np.random.default_rng(seed)
    return float(np.mean([foreground_fraction(world.render(world.sample_scene(rng))) for _ in range(count)]))


def write_report(out: Path, s: Settings, figures: bool = True) -> dict:
    runs = finished(out, s)
    base = read_scores(out / "eval" / "base.json")
    summary = report.summarize(base, {n: [read_scores(d / "eval.json") for d in dirs] for n, dirs in runs.items()})
    method_names = list(s.methods)
    window_names = [s.window_method] + [window_name(w, s.window_method) for w in s.windows]
    fg = diagnostics_column(out, runs, heldout_stage(out, s))
    text = ["## Methods (all t)", "", report.markdown_table(summary, method_names, float(base.mean()), "method", fg),
            f"## Windows ({s.window_method}, t drawn from the window only; the first row is every t)", "",
            report.markdown_table(summary, window_names, float(base.mean()), "window", fg),
            "Named / empty / foreground: mean score of the quadrants the caption names, of the quadrants it "
            "leaves empty (1 = nothing drawn there), and the mean fraction of foreground pixels; rendered world "
            f"scenes have about 0.99 / 1 / {world_foreground(s.seed + 6):.3f}.", ""]
    report.write_json(out / "results.json", {"settings": asdict(s), "base_mean": float(base.mean()),
                                             "variants": summary})
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")
    if figures:
        folder = out / "figures"
        folder.mkdir(exist_ok=True)
        report.credit_figure({n: runs[n] for n in method_names}, folder / "credit_methods.png")
        report.correction_figure({n: runs[n] for n in method_names}, folder / "correction_methods.png")
        report.correction_figure({n: runs[n] for n in method_names}, folder / "correction_cumulative_methods.png",
                                 cumulative=True)
        report.credit_figure({n: runs[n] for n in window_names[1:]}, folder / "credit_windows.png")
        samples_grid(out, method_names + window_names[1:], min(6, len(base)), folder / "samples.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "prepare", "report"],
                        help="all (default): every stage; prepare: stages 1-7 (up to the base's "
                             "evaluation); report: only the tables and figures")
    parser.add_argument("--smoke", action="store_true", help="the tiny settings (a few minutes)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/miniature[_smoke])")
    parser.add_argument("--bin", type=Path, default=ROOT / "build" / "dde_train", help="the dde_train binary")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    out = (args.out or ROOT / "runs" / ("miniature_smoke" if args.smoke else "miniature")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.command in ("all", "prepare"):
        if not args.bin.is_file():
            print(f"miniature: {args.bin}: no dde_train binary: run scripts/build.sh or pass --bin", file=sys.stderr)
            return 2
        start = time.perf_counter()
        heldout = heldout_stage(out, s)
        vae_stage(out, s)
        init_stage(out, s)
        sft_data_stage(out, s, heldout)
        log("base: pretraining with dde_train --method sft")
        base_stage(out, s, args.bin)
        log("pairs: sampling the base, labelling with the annotator")
        pairs_stage(out, s, heldout)
        base_eval_stage(out, s, heldout)
        if args.command == "prepare":
            log(f"prepared in {time.perf_counter() - start:.0f} s")
            return 0
        log(f"preference runs: {len(variants(s))} variants x {len(s.seeds)} seeds")
        runs_stage(out, s, args.bin, heldout)
        log(f"done in {time.perf_counter() - start:.0f} s")
    write_report(out, s)
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
