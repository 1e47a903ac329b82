"""The miniature world experiment v2, end to end (docs/miniature.md).

    python -m miniature.run [--smoke] [--out DIR] [--bin build/dde_train] [all|prepare|report]

(PYTHONPATH=scripts:experiments; `bash experiments/miniature/run.sh` sets it.) Stages, each
skipped when its output is already there, so an interrupted run continues where it stopped:

 1. prompts: validation (chooses beta), test (reports), held-out pairs' prompts; none trained on;
 2. a small VAE trained on world images; the annotators' scores of reconstructions vs originals;
 3. the base (miniature.pretrain): a world tokenizer, text encoder and UNet pretrained together in
    Python on imperfectly captioned images, exported to TorchScript by dde_tools.export_models;
 4. the base sampled on the validation and test prompts, scored by both annotators;
 5. pairs: two base samples per prompt labelled by the content annotator (dde_tools.relabel:
    higher wins, a difference under the margin is a tie), parquet -> shards; a held-out pair set
    the same way on other prompts (dde_train's eval: implicit accuracy and misranked by t);
 6. the beta sweep: each swept variant at beta0 x {1/4, 1, 4}, first seed, scored on the
    validation prompts; the best mean (labelling annotator) is that variant's beta;
 7. the final runs: every variant at its beta and every seed (the sweep's runs are reused);
 8. report: results.json, results.md, figures/ (rewritten after every run, so a partial run
    still yields its tables).
Every stage's wall time is added to timings.json.
"""

from __future__ import annotations

import argparse
import json
import math
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

from dde_tools import eval_report, evaluate, export_diffusers, export_models, export_pickapic, plot_run, relabel
from dde_tools.export_models import quiet_torchscript
from miniature import pipeline as pipe_io
from miniature import pretrain, report, vae as vae_io, world
from miniature.annotator import ANNOTATORS, quadrant_scores

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ANNOTATOR_NAMES = ("content", "world")
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Variant:
    """One row of the results: dde_train overrides (all but beta) and whose beta it uses."""

    name: str
    sets: tuple[str, ...]
    beta_from: str  # a swept variant (itself when swept)
    epochs_factor: float = 1.0  # x Settings.epochs


def _window(method: str, lo: int, hi: int) -> Variant:
    return Variant(f"{method}_t{lo}-{hi}", (f"method.name={method}", f"method.t_lo={lo}", f"method.t_hi={hi}"),
                   method)


VARIANTS = (
    Variant("uniform", ("method.name=uniform",), "uniform"),
    Variant("dde", ("method.name=dde",), "dde"),
    Variant("dde_single", ("method.name=dde_single",), "dde_single"),
    Variant("dde_calibrated", ("method.name=dde", "method.temperature=calibrated"), "dde_calibrated"),
    Variant("dde_single_calibrated", ("method.name=dde_single", "method.temperature=calibrated"),
            "dde_single_calibrated"),
    Variant("dde_debias", ("method.name=dde", "method.ema_debias=true"), "dde"),
    Variant("uniform_ct", ("method.name=uniform_ct",), "uniform"),
    _window("uniform", 200, 700),
    _window("uniform", 0, 100),
    _window("uniform", 900, 1000),
    _window("dde", 200, 700),
    # The regime probe: does a 4x longer run rank the training pairs (first seed only)?
    Variant("uniform_long", ("method.name=uniform",), "uniform", 4.0),
    Variant("dde_long", ("method.name=dde",), "dde", 4.0),
)
# (a, b): the paired differences a - b the report gives intervals for.
CONTRASTS = (("dde", "uniform"), ("dde_single", "uniform"), ("dde", "dde_single"),
             ("dde_calibrated", "dde"), ("dde_single_calibrated", "dde_single"), ("dde_debias", "dde"),
             ("uniform_ct", "uniform"), ("dde_t200-700", "dde"), ("dde_t200-700", "uniform_t200-700"),
             ("dde_long", "uniform_long"), ("uniform_long", "uniform"), ("dde_long", "dde"))


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    val_prompts: int = 40
    test_prompts: int = 100
    images_per_prompt: int = 2
    vae_images: int = 4000
    vae_steps: int = 800
    vae_batch: int = 32
    recon_images: int = 500
    base_rows: int = 20000
    caption_noise: float = 0.2  # fraction of pretraining captions with one attribute changed
    base: pretrain.PretrainSettings = pretrain.PretrainSettings()
    pair_prompts: int = 640
    eval_pair_prompts: int = 96
    labeller: str = "content"
    sample_steps: int = 20  # DDIM
    guidance: float = 3.0
    tie_margin: float = 0.02  # annotator units
    epochs: float = 4.0  # passes over the training pairs in every preference run
    batch: int = 32  # pairs per preference step
    lr: float = 3e-5  # 3e-4 (v1's) wrecked the v2 base: docs/miniature.md
    beta0: float = 500.0
    sweep: tuple[str, ...] = ("uniform", "dde", "dde_single", "dde_calibrated", "dde_single_calibrated")
    factors: tuple[float, ...] = (0.25, 1.0, 4.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS if v.epochs_factor == 1.0)
    long_variants: tuple[str, ...] = ("uniform_long", "dde_long")
    eval_t_bins: tuple[int, ...] = (100, 300, 500, 700, 900)
    parallel: int = 2


FULL = Settings()
SMOKE = replace(FULL, val_prompts=4, test_prompts=6, images_per_prompt=1, vae_images=256, vae_steps=20,
                recon_images=32, base_rows=128, base=pretrain.PretrainSettings(steps=4, batch=16), pair_prompts=40,
                eval_pair_prompts=8, sample_steps=3, epochs=0.5, batch=8, sweep=("uniform", "dde", "dde_single"),
                factors=(0.25, 4.0), seeds=(0, 1), eval_t_bins=(100, 500, 900),
                variants=("uniform", "dde", "dde_single", "dde_calibrated", "uniform_ct", "uniform_t200-700"),
                long_variants=("uniform_long",))


def log(message: str) -> None:
    print(f"[miniature {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Timings:
    """Seconds per stage, accumulated over resumed invocations, in out/timings.json."""

    def __init__(self, out: Path) -> None:
        self.path, self.lock = out / "timings.json", threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            data[stage] = data.get(stage, 0.0) + seconds
            report.write_json(self.path, data)


def variant(name: str) -> Variant:
    found = [v for v in VARIANTS if v.name == name]
    if not found:
        raise ValueError(f"miniature: unknown variant {name!r}; known: {', '.join(v.name for v in VARIANTS)}")
    return found[0]


# --- stages 1-3: prompts, VAE, base -------------------------------------------------------------


def prompts_stage(out: Path, s: Settings) -> dict[str, list[str]]:
    """Validation, test and held-out-pair prompts, mutually distinct."""
    path = out / "prompts.json"
    if not path.is_file():
        val = world.prompts(s.seed + 1, s.val_prompts)
        test = world.prompts(s.seed + 11, s.test_prompts, exclude=set(val))
        pairs = world.prompts(s.seed + 12, s.eval_pair_prompts, exclude=set(val) | set(test))
        report.write_json(path, {"val": val, "test": test, "eval_pairs": pairs})
    return json.loads(path.read_text())


def vae_stage(out: Path, s: Settings) -> dict:
    """Train the VAE and score its reconstructions of unseen scenes against the originals."""
    folder, report_path = out / "vae", out / "vae_report.json"
    if report_path.is_file():
        return json.loads(report_path.read_text())
    if (folder / "config.json").is_file():  # trained, but stopped before its report
        model = vae_io.AutoencoderKL.from_pretrained(folder)
    else:
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
    result = {"images": len(scenes), "pixel_mse": float(((reconstruction.clamp(-1, 1) - x) ** 2).mean()),
              "scaling_factor": float(model.config.scaling_factor)}
    for name in ANNOTATOR_NAMES:
        original = ANNOTATORS[name]().score(originals, captions)
        recon = ANNOTATORS[name]().score(vae_io.to_images(reconstruction), captions)
        result[name] = {"original_mean": float(original.mean()), "reconstruction_mean": float(recon.mean()),
                        "mean_abs_change": float(np.abs(recon - original).mean())}
    report.write_json(report_path, result)
    log(f"vae: {result}")
    return result


def base_stage(out: Path, s: Settings, prompts: dict[str, list[str]]) -> Path:
    manifest = out / "base" / "export" / "manifest.json"
    if manifest.is_file():
        return manifest
    torch.set_num_threads(max(1, s.parallel))  # nothing else runs beside it
    exclude = set(prompts["val"]) | set(prompts["test"]) | set(prompts["eval_pairs"])
    summary = pretrain.build_base(out / "vae", out / "base" / "pipeline", s.base_rows, s.caption_noise, exclude,
                                  s.base, log)
    torch.set_num_threads(1)
    report.write_json(out / "base" / "pretrain.json", summary | {"settings": asdict(s.base)})
    with quiet_torchscript():
        export_models.export_pipeline(out / "base" / "pipeline", out / "base" / "export")
    return manifest


# --- sampling and scoring -----------------------------------------------------------------------


def sample(pipeline_dir: Path, name: str, prompts: list[str], images_per_prompt: int, folder: Path,
           s: Settings, seed: int) -> list[dict]:
    """dde_tools.evaluate.sample (image j of prompt i from seed + 1000 i + j), scored by both annotators
    and by the named-quadrant score ("named")."""
    args = argparse.Namespace(out=folder, images_per_prompt=images_per_prompt, sample_batch_size=64, seed=seed,
                              steps=s.sample_steps, height=None, width=None)
    entry = evaluate.Pipeline(name, pipeline_dir, "StableDiffusionPipeline", s.guidance)
    records = evaluate.sample(entry, prompts, args, torch.device("cpu"), torch.float32)
    images = [Image.open(folder / r["image"]).convert("RGB") for r in records]
    texts = [r["prompt"] for r in records]
    for annotator in ANNOTATOR_NAMES:
        for record, value in zip(records, ANNOTATORS[annotator]().score(images, texts)):
            record[annotator] = float(value)
    for record, image, text in zip(records, images, texts):
        record["named"] = float(np.mean(quadrant_scores(image, text)[0]))
    return records


def evaluate_pipeline(pipeline_dir: Path, model: str, prompts: dict[str, list[str]], out: Path, s: Settings,
                      splits: tuple[str, ...] = SPLITS) -> dict:
    """Scores of one pipeline per split: {split: {annotator: [[...]]}}; named = named-quadrant score."""
    result = {}
    for split in splits:
        folder = out / "eval" / split
        records = sample(pipeline_dir, model, prompts[split], s.images_per_prompt, folder, s, seed=0)
        shape = (len(prompts[split]), s.images_per_prompt)
        result[split] = {key: eval_report.score_table(records, model, key, shape).tolist()
                         for key in (*ANNOTATOR_NAMES, "named")}
    return result


# --- stage 4: the base's scores; stage 5: pairs -------------------------------------------------


def base_eval_stage(out: Path, s: Settings, prompts: dict[str, list[str]]) -> dict:
    path = out / "eval" / "base.json"
    if not path.is_file():
        report.write_json(path, evaluate_pipeline(out / "base" / "pipeline", "base", prompts, out, s))
    scores = json.loads(path.read_text())
    log("base: " + ", ".join(f"{split} {k} {np.mean(v):.3f}" for split in SPLITS for k, v in scores[split].items()))
    return scores


def shards(parquet: Path, out: Path, tokenizer: Path) -> Path:
    index = out / "index.json"
    if not index.is_file():
        result = export_pickapic.export([parquet], out, [tokenizer], pairs_per_shard=512)
        log(export_pickapic.summary(result, out))
    return index


def labelled_pairs(out: Path, s: Settings, name: str, prompts: list[str], seed: int) -> Path:
    """Two base samples per prompt, labelled by the labelling annotator, as shards."""
    parquet = out / name / "pairs.parquet"
    if not parquet.is_file():
        folder = out / name / "samples"
        records = sample(out / "base" / "pipeline", "base", prompts, 2, folder, s, seed=seed)
        by_key = {(r["prompt_index"], r["image_index"]): r for r in records}
        rows = [pipe_io.pickapic_row(i, p, (folder / by_key[(i, 0)]["image"]).read_bytes(),
                                     (folder / by_key[(i, 1)]["image"]).read_bytes(), 0.5)
                for i, p in enumerate(prompts)]
        table = pa.Table.from_pylist(rows, schema=pipe_io.fixtures.PICKAPIC_SCHEMA)
        counts = relabel.Counts()
        table = relabel.relabel_table(table, ANNOTATORS[s.labeller](), s.tie_margin, 256, counts)
        scores = np.asarray([r[s.labeller] for r in records])
        gaps = np.abs(np.asarray(table.column("score_0")) - np.asarray(table.column("score_1")))
        report.write_json(out / name / "stats.json", {
            "prompts": len(rows), "labels": counts.new_labels, "tie_margin": s.tie_margin, "labeller": s.labeller,
            "sample_score_mean": float(scores.mean()), "sample_score_std": float(scores.std()),
            "sample_score_percentiles_5_50_95": np.percentile(scores, [5, 50, 95]).tolist(),
            "pair_gap_mean": float(gaps.mean()), "pair_gap_median": float(np.median(gaps))})
        pq.write_table(table, parquet.with_suffix(".tmp"), row_group_size=512)
        os.replace(parquet.with_suffix(".tmp"), parquet)
        shutil.rmtree(folder)
    return shards(parquet, out / name / "shards", out / "base" / "export" / "tokenizer")


def training_pairs(out: Path) -> int:
    index = json.loads((out / "pairs" / "shards" / "index.json").read_text())
    return sum(int(shard["pairs"]) for shard in index["shards"])


# --- stages 6-7: the preference runs ------------------------------------------------------------


def run_dir(out: Path, name: str, beta: float, seed: int) -> Path:
    return out / "runs" / name / f"beta{beta:g}" / f"seed{seed}"


def steps_for(out: Path, s: Settings, name: str = "uniform") -> int:
    """Optimizer steps of a run: Settings.epochs over the pairs, times the variant's factor."""
    standard = max(1, math.ceil(s.epochs * training_pairs(out) / s.batch))
    return math.ceil(variant(name).epochs_factor * standard)


def train(binary: Path, run: Path, sets: list[str], steps: int) -> Path:
    """Run dde_train unless `run` already holds its final checkpoint; return that checkpoint."""
    checkpoint = run / "checkpoints" / f"step-{steps:08d}"
    if (checkpoint / "COMPLETE").is_file():
        return checkpoint
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = [str(binary), "--config", str(HERE / "preference.yaml"), "--set", f"run.output_dir={run}"]
    for value in sets:
        command += ["--set", value]
    with open(run / "stdout.log", "w") as stdout:
        result = subprocess.run(command, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0 or not (checkpoint / "COMPLETE").is_file():
        raise RuntimeError(f"dde_train failed (exit {result.returncode}): see {run / 'stdout.log'}")
    return checkpoint


def run_one(out: Path, s: Settings, binary: Path, job: tuple[str, float, int], prompts: dict,
            eval_lock: threading.Lock, timings: Timings) -> Path:
    """Train one variant at one beta and seed from the base, export it, sample and score the test
    prompts (and the validation prompts for a sweep run)."""
    name, beta, seed = job
    splits = SPLITS if job in sweep_jobs(s) else ("test",)
    folder = run_dir(out, name, beta, seed)
    result = folder / "eval.json"
    if result.is_file():
        return result
    start = time.perf_counter()
    steps = steps_for(out, s, name)
    eval_sets = [f"data.eval_index={out / 'eval_pairs' / 'shards' / 'index.json'}",
                 f"eval.every={steps_for(out, s)}",  # a long run is evaluated at every standard length
                 "eval.t_bins=[" + ", ".join(str(t) for t in s.eval_t_bins) + "]"]
    checkpoint = train(binary, folder, [
        f"model.manifest={out / 'base' / 'export' / 'manifest.json'}",
        f"data.index={out / 'pairs' / 'shards' / 'index.json'}", f"run.seed={seed}", f"method.beta={beta:g}",
        f"train.max_steps={steps}", f"checkpoint.every={steps}", f"train.global_batch={s.batch}",
        f"train.micro_batch={s.batch}", f"optim.lr={s.lr:g}", *eval_sets, *variant(name).sets], steps)
    trained = time.perf_counter() - start
    with eval_lock:  # one in-process sampler at a time: two heavy processes at most
        pipeline_dir = export_diffusers.export(checkpoint, folder / "pipeline", out / "base" / "pipeline")
        scores = evaluate_pipeline(pipeline_dir, f"{name}-b{beta:g}-s{seed}", prompts, out, s, splits)
        shutil.rmtree(pipeline_dir)
    report.write_json(result, scores | {"name": name, "beta": beta, "seed": seed, "steps": steps,
                                        "train_seconds": trained, "seconds": time.perf_counter() - start})
    timings.add("preference runs (process seconds)", time.perf_counter() - start)
    log(f"{name} beta {beta:g} seed {seed}: trained in {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    return result


def sweep_jobs(s: Settings) -> list[tuple[str, float, int]]:
    return [(name, s.beta0 * f, s.seeds[0]) for name in s.sweep for f in s.factors]


def chosen_betas(out: Path, s: Settings) -> dict[str, dict]:
    """Swept variant -> {beta, val means per beta}: the best validation mean of the labeller."""
    chosen = {}
    for name in s.sweep:
        means = {}
        for _, beta, seed in [j for j in sweep_jobs(s) if j[0] == name]:
            path = run_dir(out, name, beta, seed) / "eval.json"
            if path.is_file():
                means[beta] = float(np.mean(json.loads(path.read_text())["val"][s.labeller]))
        if len(means) == len(s.factors):
            chosen[name] = {"beta": max(means, key=means.get), "val_means": {f"{b:g}": m for b, m in means.items()}}
    return chosen


def beta_of(name: str, chosen: dict[str, dict], s: Settings) -> float:
    source = variant(name).beta_from
    return chosen[source]["beta"] if source in chosen else s.beta0


def runs_stage(out: Path, s: Settings, binary: Path, prompts: dict, timings: Timings) -> None:
    """The sweep, then every variant at its beta and every seed; the report after every run."""
    lock, table_lock = threading.Lock(), threading.Lock()

    def job(name: str, beta: float, seed: int) -> None:
        if (run_dir(out, name, beta, seed) / "eval.json").is_file():
            return  # done by an earlier invocation: its tables were written then
        run_one(out, s, binary, (name, beta, seed), prompts, lock, timings)
        with table_lock:
            write_report(out, s, figures=False)

    with ThreadPoolExecutor(max_workers=s.parallel) as pool:
        for future in [pool.submit(job, *j) for j in sweep_jobs(s)]:
            future.result()
    chosen = chosen_betas(out, s)
    report.write_json(out / "chosen_beta.json", chosen)
    log("chosen beta: " + ", ".join(f"{n} {c['beta']:g}" for n, c in chosen.items()))
    finals = [(name, beta_of(name, chosen, s), seed) for seed in s.seeds for name in s.variants]
    finals += [(name, beta_of(name, chosen, s), s.seeds[0]) for name in s.long_variants]
    with ThreadPoolExecutor(max_workers=s.parallel) as pool:
        for future in [pool.submit(job, *j) for j in finals]:
            future.result()


# --- stage 8: report ----------------------------------------------------------------------------


def final_runs(out: Path, s: Settings) -> dict[str, list[Path]]:
    """Variant -> finished run folders at its chosen beta, in seed order."""
    chosen = chosen_betas(out, s)
    return {name: [run_dir(out, name, beta_of(name, chosen, s), seed) for seed in s.seeds
                   if (run_dir(out, name, beta_of(name, chosen, s), seed) / "eval.json").is_file()]
            for name in (*s.variants, *s.long_variants)}


def load_scores(folders: list[Path], split: str, key: str) -> np.ndarray:
    return np.stack([np.asarray(json.loads((f / "eval.json").read_text())[split][key]) for f in folders])


def held_out_eval(folder: Path) -> dict | None:
    """The last dde_train eval record of a run (held-out implicit accuracy, misranked by t)."""
    evals = plot_run.read_records(folder)["eval"]
    return evals[-1] if evals else None


def sweep_scores(out: Path, s: Settings) -> list[tuple[str, float, int, dict]]:
    """(variant, beta, seed, validation scores) of every finished sweep run."""
    found = []
    for name, beta, seed in sweep_jobs(s):
        path = run_dir(out, name, beta, seed) / "eval.json"
        if path.is_file():
            found.append((name, beta, seed, json.loads(path.read_text())["val"]))
    return found


def write_figures(out: Path, s: Settings, runs: dict[str, list[Path]]) -> None:
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    methods = [n for n in ("uniform", "uniform_ct", "dde", "dde_calibrated", "dde_debias", "dde_single",
                           "dde_single_calibrated") if runs.get(n)]
    report.credit_heatmaps({n: runs[n] for n in (*methods, "dde_t200-700", *s.long_variants) if runs.get(n)},
                           folder / "credit_heatmaps.png")
    report.misranked_by_t({n: runs[n] for n in runs}, folder / "misranked_by_t.png")
    report.credit_figure({n: runs[n] for n in methods}, folder / "credit_methods.png")
    report.correction_figure({n: runs[n] for n in methods if n.startswith("dde")},
                             folder / "correction_cumulative_methods.png", cumulative=True)
    models = [("base", "base")] + [
        (name, f"{name}-b{beta_of(name, chosen_betas(out, s), s):g}-s{dirs[0].name.removeprefix('seed')}")
        for name, dirs in runs.items() if dirs]
    report.samples_grid(out / "eval" / "test", models, min(6, s.test_prompts), folder / "samples.png")


def write_report(out: Path, s: Settings, figures: bool = True) -> dict:
    base = json.loads((out / "eval" / "base.json").read_text())
    runs = final_runs(out, s)
    chosen = chosen_betas(out, s)
    results = report.summarize_v2(base, runs, ANNOTATOR_NAMES, CONTRASTS, load_scores, "test")
    results["held_out"] = {name: report.held_out_summary([held_out_eval(d) for d in dirs])
                           for name, dirs in runs.items() if dirs}
    epoch_steps = max(1, math.ceil(training_pairs(out) / s.batch))
    results["training_ranking"] = {name: report.training_ranking(
        [r for d in dirs for r in plot_run.read_records(d)["step"][-epoch_steps:]], epoch_steps * len(dirs))
        for name, dirs in runs.items() if dirs}
    results["chosen_beta"] = chosen
    results["betas"] = {name: beta_of(name, chosen, s) for name in (*s.variants, *s.long_variants)}
    results["sweep"] = report.sweep_rows(sweep_scores(out, s), ANNOTATOR_NAMES)
    results["settings"] = asdict(s)
    report.write_json(out / "results.json", results)
    text = report.markdown_v2(results, (*s.variants, *s.long_variants), ANNOTATOR_NAMES, s.labeller)
    (out / "results.md").write_text(text, encoding="utf-8")
    if figures:
        write_figures(out, s, runs)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "prepare", "report"],
                        help="all (default): every stage; prepare: stages 1-5 (the base, its scores and the "
                             "pairs); report: only the tables and figures")
    parser.add_argument("--smoke", action="store_true", help="the tiny settings (a few minutes)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/miniature[_smoke])")
    parser.add_argument("--bin", type=Path, default=ROOT / "build" / "dde_train", help="the dde_train binary")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    out = (args.out or ROOT / "runs" / ("miniature_smoke" if args.smoke else "miniature")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    timings = Timings(out)
    if args.command in ("all", "prepare"):
        if not args.bin.is_file():
            print(f"miniature: {args.bin}: no dde_train binary: run scripts/build.sh or pass --bin", file=sys.stderr)
            return 2
        start = time.perf_counter()
        for stage, work in (("prompts", lambda: prompts_stage(out, s)), ("vae", lambda: vae_stage(out, s))):
            t0 = time.perf_counter()
            work()
            timings.add(stage, time.perf_counter() - t0)
        prompts = prompts_stage(out, s)
        stages = (("base pretraining and export", lambda: base_stage(out, s, prompts)),
                  ("base evaluation", lambda: base_eval_stage(out, s, prompts)),
                  ("pairs", lambda: labelled_pairs(out, s, "pairs", world.prompts(
                      s.seed + 5, s.pair_prompts, exclude=set(prompts["val"]) | set(prompts["test"]) | set(
                          prompts["eval_pairs"])), seed=10_000_000)),
                  ("held-out pairs", lambda: labelled_pairs(out, s, "eval_pairs", prompts["eval_pairs"],
                                                            seed=20_000_000)))
        for stage, work in stages:
            t0 = time.perf_counter()
            log(stage)
            work()
            timings.add(stage, time.perf_counter() - t0)
        if args.command == "prepare":
            log(f"prepared in {time.perf_counter() - start:.0f} s")
            return 0
        log(f"preference runs: sweep {len(sweep_jobs(s))}, then {len(s.variants)} variants x {len(s.seeds)} seeds, "
            f"{steps_for(out, s)} steps each")
        t0 = time.perf_counter()
        runs_stage(out, s, args.bin, prompts, timings)
        timings.add("preference runs (wall)", time.perf_counter() - t0)
        log(f"done in {time.perf_counter() - start:.0f} s")
    t0 = time.perf_counter()
    write_report(out, s)
    timings.add("report", time.perf_counter() - t0)
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
