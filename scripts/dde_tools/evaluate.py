"""Sample from diffusers pipelines on a prompt set and score every image with annotators.

CLI: python -m dde_tools.evaluate --pipeline [NAME=]DIR [--pipeline [NAME=]DIR ...] --prompts FILE
     --out DIR [annotator flags] [--images-per-prompt N] [--seed S] [--steps 50] [--guidance G]
     [--height H --width W] [--base NAME] [--bootstrap N] [--device auto] [--dtype auto] [--sample-only]

Every pipeline draws image j of prompt i from the seed `seed + 1000 i + j` (a CPU generator
per image, so batching and device change nothing but rounding): the images of different
pipelines pair up by prompt and seed. DDIM with the pipeline's scheduler config; guidance
7.5 for SD1.5 and 5.0 for SDXL unless --guidance is given.

Before any sampling, every input is checked and every annotator is loaded and scores one test
image (then freed), so a wrong file or architecture flag stops the run at once. Pipelines are
sampled one after the other (a progress bar on stderr), each model's weights checked to be
finite; then each annotator is loaded once and scores every image, so one large model is in
memory at a time. An image with a NaN or Inf pixel is saved, flagged (`finite: false`) and not
scored: it counts in no mean and no win rate, summary.md says so, and the exit code is 3.

Writes into OUT.dde-partial next to OUT, renamed to OUT when done: images/NAME/PPPPP_JJ.png,
scores.jsonl (one line per image), summary.json, summary.md, grid.png. A run that stops keeps
OUT.dde-partial; the next run with the same settings goes on from its finished images (and
reuses those of an earlier OUT). `--sample-only` draws the images without annotators.
Exit codes: 0 done, 1 a write failed, 2 bad input, 3 done with flagged images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from dde_tools import annotators as ann
from dde_tools import eval_report
from dde_tools.common import (
    EXIT_FLAGGED,
    MARKER,
    Progress,
    StagedOutput,
    ToolError,
    check_output,
    first_nonfinite,
    open_image_rgb,
    run_main,
    write_json_atomic,
)

TOOL = "evaluate"
GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusionXLPipeline": 5.0}
MAX_IMAGES_PER_PROMPT = 1000  # the seed layout: seed + 1000 * prompt + image
MAX_SIDE = 4096  # pixels; bounds the memory of one image (--height/--width, and every image read back)
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLING_FILE = "sampling.json"  # images/NAME/: the settings its images were drawn with
DONE_FILE = "done.jsonl"  # images/NAME/: one line per finished image
OWN_PATTERNS = ("images", "scores.jsonl", "summary.json", "summary.md", "grid.png", "*.tmp")


@dataclass
class Pipeline:
    name: str
    path: Path
    class_name: str
    guidance: float


def read_prompts(path: Path, limit: int | None) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or the unique `caption`s of a parquet file."""
    expected = "a .txt file with one prompt a line, or a parquet file with a 'caption' column"
    if not Path(path).is_file():
        raise ToolError(path, "prompt file not found", expected, "nothing at that path", "Pass --prompts FILE.")
    if Path(path).suffix == ".parquet":
        try:
            captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
        except Exception as err:  # pyarrow raises several types for a bad file or a missing column
            raise ToolError(path, "cannot read the 'caption' column", expected, str(err)[:200],
                            "Pass a Pick-a-Pic parquet file or a text file.") from err
        prompts = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))
    else:
        try:
            prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise ToolError(path, "not UTF-8 text", expected, str(err)[:200], "Pass a text file.") from err
    if not prompts:
        raise ToolError(path, "no prompts", "at least one non-empty prompt", "none", "Fill the file.")
    return prompts[:limit] if limit else prompts


def parse_pipeline(value: str, guidance: float | None) -> Pipeline:
    """`NAME=DIR` or `DIR` (the name is the folder's name): a diffusers SD1.5 or SDXL pipeline folder."""
    name, _, folder = value.partition("=") if "=" in value else ("", "", value)
    path = Path(folder)
    name = name or path.resolve().name
    if not NAME_PATTERN.fullmatch(name):
        raise ToolError(f"--pipeline {value}", "bad name", "letters, digits, '.', '_' or '-'", repr(name),
                        "Pass --pipeline NAME=DIR.")
    index = path / "model_index.json"
    if not index.is_file():
        raise ToolError(path, "not a diffusers pipeline folder", "a folder with model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/", "no model_index.json" if path.is_dir()
                        else "no such folder", "Pass the pipeline folder (export_diffusers writes one).")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ToolError(index, "model_index.json does not parse", "a JSON object with _class_name",
                        f"{type(err).__name__}: {err}"[:200], "Copy or export the pipeline again.") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in GUIDANCE:
        raise ToolError(index, "unsupported pipeline class", f"one of {sorted(GUIDANCE)}", repr(class_name),
                        "Pass an SD1.5 or SDXL pipeline.")
    return Pipeline(name, path, class_name, GUIDANCE[class_name] if guidance is None else guidance)


def fingerprint(path: Path) -> str:
    """Size and modification time of every file of a pipeline folder: a changed model draws anew."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            digest.update(f"{os.path.relpath(os.path.join(root, name), path)}\0{info.st_size}\0"
                          f"{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_pipeline(pipeline: Pipeline, device: torch.device, dtype: torch.dtype):
    """The pipeline with a DDIM scheduler, every component's weights checked to be finite."""
    import diffusers

    cls = getattr(diffusers, pipeline.class_name)
    diffusers.utils.logging.set_verbosity_error()  # not "install accelerate" once per component
    diffusers.utils.logging.disable_progress_bar()
    try:
        pipe = cls.from_pretrained(pipeline.path, torch_dtype=dtype, local_files_only=True)
    except Exception as err:  # diffusers, transformers and safetensors raise many types for a bad folder
        raise ToolError(pipeline.path, f"cannot load a {pipeline.class_name}", "a complete diffusers folder",
                        f"{type(err).__name__}: {err}"[:300], "Check the folder's components.") from err
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            bad = first_nonfinite(module)
            if bad:
                hint = "" if dtype == torch.float32 else f" (in {str(dtype).removeprefix('torch.')}: if the " \
                    "float32 weights are finite, pass --dtype fp32)"
                raise ToolError(pipeline.path / component, f"pipeline {pipeline.name}: non-finite weights",
                                "finite values", f"{component}: {bad[0]} holds {bad[1]} NaN or Inf values{hint}",
                                "The model is damaged (a diverged run?): evaluate another checkpoint.")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _to_uint8(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(uint8 pixels as diffusers' numpy_to_pil makes them, whether every value was finite)."""
    finite = bool(np.isfinite(image).all())
    pixels = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    return (pixels * 255).round().astype(np.uint8), finite


def sampling_settings(pipeline: Pipeline, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    return {"pipeline": str(pipeline.path.resolve()), "fingerprint": fingerprint(pipeline.path),
            "class": pipeline.class_name, "guidance": pipeline.guidance, "steps": args.steps,
            "height": args.height, "width": args.width, "dtype": str(dtype), "scheduler": "DDIMScheduler"}


def _image_ok(path: Path, size: list[int]) -> bool:
    """The PNG is there, its header says the recorded size (within MAX_SIDE), and its chunks' CRCs
    are right (Pillow's verify: no pixel is decoded)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or list(image.size) != list(size) or max(size) > MAX_SIDE:
                return False
            image.verify()
    except Exception:  # a damaged image is drawn again
        return False
    return True


def finished_images(folder: Path, settings: dict, prompts: list[str], args: argparse.Namespace) -> dict:
    """(prompt, image) -> record of the images in `folder` drawn with `settings` for these prompts."""
    try:
        if json.loads((folder / SAMPLING_FILE).read_text(encoding="utf-8")) != settings:
            return {}
        lines = (folder / DONE_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return {}
    done = {}
    for line in lines:
        try:
            record = json.loads(line)
            i, j = record["prompt_index"], record["image_index"]
            if i < len(prompts) and j < args.images_per_prompt and record["prompt"] == prompts[i] and \
                    record["seed"] == args.seed + MAX_IMAGES_PER_PROMPT * i + j and \
                    _image_ok(folder.parent.parent / record["image"], record["size"]):
                done[(i, j)] = record
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: that image is drawn again
    return done


def prepare_folder(stage: Path, previous: Path | None, pipeline: Pipeline, settings: dict, prompts: list[str],
                   args: argparse.Namespace) -> dict:
    """stage/images/NAME ready to resume: finished images kept, those of a previous output linked in."""
    folder = stage / "images" / pipeline.name
    try:
        same = json.loads((folder / SAMPLING_FILE).read_text(encoding="utf-8")) == settings
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(folder, ignore_errors=True)  # drawn by this tool with other settings
        folder.mkdir(parents=True)
        write_json_atomic(folder / SAMPLING_FILE, settings)
        (folder / DONE_FILE).touch()
    done = finished_images(folder, settings, prompts, args)
    if previous is not None:
        reused = finished_images(previous / "images" / pipeline.name, settings, prompts, args)
        with open(folder / DONE_FILE, "a", encoding="utf-8") as lines:
            for key, record in sorted(reused.items()):
                if key in done:
                    continue
                target = stage / record["image"]
                target.unlink(missing_ok=True)
                try:
                    os.link(previous / record["image"], target)
                except OSError:
                    shutil.copyfile(previous / record["image"], target)
                lines.write(json.dumps(record) + "\n")
                done[key] = record
    return done


def sample(pipeline: Pipeline, prompts: list[str], args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype, stage: Path | None = None, done: dict | None = None) -> list[dict]:
    """Draw the images of one pipeline not in `done` into stage/images/NAME (stage: args.out by
    default, as experiments/miniature calls it); one record per image."""
    stage = Path(args.out) if stage is None else stage
    done = {} if done is None else done
    folder = stage / "images" / pipeline.name
    folder.mkdir(parents=True, exist_ok=True)
    items = [(i, j) for i in range(len(prompts)) for j in range(args.images_per_prompt)]
    todo = [item for item in items if item not in done]
    progress = Progress(len(items), f"{TOOL}: {pipeline.name}", initial=len(items) - len(todo))
    records = dict(done)
    try:
        if todo:
            pipe = load_pipeline(pipeline, device, dtype)
            with open(folder / DONE_FILE, "a", encoding="utf-8") as lines:
                for chunk in ann.batches(len(todo), args.sample_batch_size):
                    batch = todo[chunk]
                    seeds = [args.seed + MAX_IMAGES_PER_PROMPT * i + j for i, j in batch]
                    try:
                        output = pipe(prompt=[prompts[i] for i, _ in batch], num_inference_steps=args.steps,
                                      guidance_scale=pipeline.guidance, height=args.height, width=args.width,
                                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                                      output_type="np")
                    except torch.OutOfMemoryError as err:
                        raise ToolError("--sample-batch-size", "out of GPU memory while sampling",
                                        "a batch that fits", f"{args.sample_batch_size} images",
                                        "Lower --sample-batch-size (finished images are kept).") from err
                    nsfw = getattr(output, "nsfw_content_detected", None) or [None] * len(batch)
                    for (i, j), seed, image, flagged in zip(batch, seeds, output.images, nsfw):
                        pixels, finite = _to_uint8(np.asarray(image))
                        relative = Path("images") / pipeline.name / f"{i:05d}_{j:02d}.png"
                        tmp = stage / relative.with_name(f".{relative.name}.tmp")
                        Image.fromarray(pixels).save(tmp, format="PNG")
                        os.replace(tmp, stage / relative)
                        record = {"model": pipeline.name, "prompt_index": i, "image_index": j, "seed": seed,
                                  "prompt": prompts[i], "image": str(relative), "nsfw": flagged,
                                  "finite": finite, "size": [pixels.shape[1], pixels.shape[0]]}
                        lines.write(json.dumps(record) + "\n")
                        lines.flush()
                        records[(i, j)] = record
                        progress.update()
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    return [records[item] | {"model": pipeline.name} for item in items]


def score(records: list[dict], spec: ann.AnnotatorSpec, out: Path, device: torch.device, batch_size: int) -> None:
    """Add the annotator's score to every record (key: the annotator's name); None for an image with
    non-finite pixels and for a non-finite score."""
    annotator = ann.load(spec, device)
    usable = [r for r in records if r.get("finite", True)]
    for r in records:
        r[spec.name] = None
    for chunk in ann.batches(len(usable), batch_size):
        batch = usable[chunk]
        images = [open_image_rgb(out / r["image"], MAX_SIDE * MAX_SIDE) for r in batch]
        for record, value in zip(batch, annotator.score(images, [r["prompt"] for r in batch])):
            record[spec.name] = float(value) if np.isfinite(value) else None
    del annotator


def check_args(args: argparse.Namespace) -> None:
    checks = [("--images-per-prompt", args.images_per_prompt, 1, MAX_IMAGES_PER_PROMPT),
              ("--steps", args.steps, 1, 10_000), ("--sample-batch-size", args.sample_batch_size, 1, 10_000),
              ("--bootstrap", args.bootstrap, 1, 10_000_000), ("--grid-prompts", args.grid_prompts, 0, 1000),
              ("--grid-size", args.grid_size, 8, 4096)]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise ToolError(flag, "out of range", f"{low}..{high}", str(value), f"Pass {flag} in that range.")
    if args.limit is not None and args.limit < 1:
        raise ToolError("--limit", "out of range", ">= 1", str(args.limit), "Pass a positive count or leave it out.")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise ToolError("--guidance", "out of range", ">= 0", str(args.guidance), "Pass a non-negative scale.")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8 or value > MAX_SIDE):
            raise ToolError(flag, "not a positive multiple of 8", f"8, 16, ..., {MAX_SIDE}", str(value),
                            "Pass a multiple of 8.")


def flagged_lines(records: list[dict], names: list[str], annotators: list[str]) -> list[str]:
    """One warning per model with non-finite images or unscored images."""
    lines = []
    for name in names:
        mine = [r for r in records if r["model"] == name]
        bad = sum(not r.get("finite", True) for r in mine)
        unscored = sum(any(r.get(a) is None for a in annotators) for r in mine if r.get("finite", True))
        if bad:
            lines.append(f"{name}: {bad} of {len(mine)} images hold NaN or Inf pixels (the model or its dtype "
                         "overflowed): not scored, left out of every mean and win rate")
        if unscored:
            lines.append(f"{name}: {unscored} images got a non-finite score: left out of that annotator's results")
    return lines


def write_outputs(records: list[dict], pipelines: list[Pipeline], specs: list[ann.AnnotatorSpec],
                  prompts: list[str], args: argparse.Namespace, base: str, out: Path) -> tuple[str, list[str]]:
    """scores.jsonl, summary.json, summary.md and grid.png into `out`; return the markdown and the flags."""
    tmp = out / "scores.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out / "scores.jsonl")
    names = [p.name for p in pipelines]
    flags = flagged_lines(records, names, [s.name for s in specs])
    settings = {"prompts": str(args.prompts), "num_prompts": len(prompts), "images_per_prompt": args.images_per_prompt,
                "seed": args.seed, "steps": args.steps, "scheduler": "DDIMScheduler",
                "height": args.height, "width": args.width,
                "pipelines": {p.name: {"path": str(p.path), "class": p.class_name, "guidance": p.guidance}
                              for p in pipelines},
                "annotators": {s.name: {"path": str(s.path), "arch": None if s.name == "pickscore" else s.arch,
                                        "unit": eval_report.UNITS[s.name]} for s in specs}}
    if specs:
        summary = eval_report.summarize(records, names, [s.name for s in specs], base,
                                        (len(prompts), args.images_per_prompt), args.bootstrap, args.seed)
        write_json_atomic(out / "summary.json", {"format": "dde-eval-summary", "version": 1,
                                                 "settings": settings, "flagged": flags} | summary)
        text = eval_report.markdown(summary, settings, flags)
    else:
        text = eval_report.sample_markdown(settings, flags)
    shown = range(min(args.grid_prompts, len(prompts)))
    if shown:
        by_key = {(r["model"], r["prompt_index"]): r for r in records if r["image_index"] == 0}
        cells = [[open_image_rgb(out / by_key[(m, i)]["image"], MAX_SIDE * MAX_SIDE) for m in names] for i in shown]
        eval_report.image_grid(cells, names, args.grid_size).save(out / "grid.png")
        text += "\n![grid](grid.png)\n\nGrid rows (image 0 of each prompt):\n\n"
        text += "".join(f"{i + 1}. {prompts[i]}\n" for i in shown)
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text, flags


def _legacy_output(folder: Path) -> bool:
    """An evaluation written before the output marker: its summary.json."""
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("format") == "dde-eval-summary"
    except (OSError, ValueError, AttributeError):
        return False


def evaluate(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Check, probe, sample, score, write; returns (summary markdown, flags)."""
    check_args(args)
    pipelines = [parse_pipeline(v, args.guidance) for v in args.pipeline]
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ToolError("--pipeline", "two pipelines share a name", "distinct names", str(names),
                        "Name them: --pipeline NAME=DIR.")
    base = args.base or names[0]
    if base not in names:
        raise ToolError("--base", "not one of the pipelines", str(names), repr(base), "Pass one of those names.")
    specs = [] if args.sample_only else ann.specs_from_args(args)
    if not specs and not args.sample_only:
        raise ToolError("annotator flags", "no annotator given", "--pickscore-model/--pickscore-processor, "
                        "--hps-checkpoint or --clip-weights (or --sample-only)", "none",
                        "Name at least one annotator's files.")
    for spec in specs:
        ann.check(spec)  # files and architecture, before hours of sampling
    prompts = read_prompts(args.prompts, args.limit)
    device = ann.resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.float16 if device.type == "cuda" else torch.float32
    inputs = [p.path for p in pipelines] + [Path(args.prompts)] + [s.path for s in specs]
    out = check_output(TOOL, args.out, inputs=inputs, no_write_inside=[p.path for p in pipelines],
                       own_patterns=OWN_PATTERNS, legacy=_legacy_output)
    for spec in specs:
        start = time.perf_counter()
        value = ann.probe(spec, device)
        print(f"{TOOL}: {spec.name} loads and scores a test image ({value:.4g}) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    previous = out if (out / MARKER).is_file() or _legacy_output(out) else None
    with StagedOutput(TOOL, out, resumable=True) as stage:
        print(f"{TOOL}: writing into {stage.folder} (renamed to {out} when done; a rerun goes on from it)",
              flush=True)
        records: list[dict] = []
        for pipeline in pipelines:
            start = time.perf_counter()
            settings = sampling_settings(pipeline, args, dtype)
            done = prepare_folder(stage.folder, previous, pipeline, settings, prompts, args)
            drawn = len(prompts) * args.images_per_prompt - len(done)
            records += sample(pipeline, prompts, args, device, dtype, stage.folder, done)
            print(f"{TOOL}: {pipeline.name}: {drawn} images drawn, {len(done)} already there "
                  f"(guidance {pipeline.guidance}, {args.steps} steps) in {time.perf_counter() - start:.1f} s",
                  flush=True)
        for spec in specs:
            start = time.perf_counter()
            score(records, spec, stage.folder, device, args.score_batch_size)
            print(f"{TOOL}: scored with {spec.name} in {time.perf_counter() - start:.1f} s", flush=True)
        result = write_outputs(records, pipelines, specs, prompts, args, base, stage.folder)
        stage.publish()
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", required=True, help="[NAME=]DIR of a diffusers pipeline; repeat")
    p.add_argument("--prompts", type=Path, required=True, help="text file (one prompt a line) or parquet (caption)")
    p.add_argument("--out", type=Path, required=True, help="output folder (absent, empty or an earlier evaluation)")
    p.add_argument("--base", help="the pipeline the others are compared with (default: the first)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, help="CFG scale (default 7.5 SD1.5, 5.0 SDXL)")
    p.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    p.add_argument("--sample-batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in grid.png (default 8)")
    p.add_argument("--grid-size", type=int, default=256, help="grid cell size in pixels (default 256)")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="sampling dtype (auto: fp16 on cuda)")
    p.add_argument("--sample-only", action="store_true",
                   help="draw the images (and grid.png) without scoring; a later run with annotators reuses them")
    ann.add_arguments(p)
    return p


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: the partial output is kept for a rerun


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        text, flags = evaluate(args)
        print(text, end="")
        for line in flags:
            print(f"{TOOL}: flagged: {line}", file=sys.stderr)
        return EXIT_FLAGGED if flags else 0

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_main(TOOL, body, on_os_error=f"; finished images stay in {args.out}.dde-partial for a rerun")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
