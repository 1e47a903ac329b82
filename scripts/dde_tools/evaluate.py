"""Sample from diffusers pipelines on a prompt set and score every image with annotators.

CLI: python -m dde_tools.evaluate --pipeline [NAME=]DIR [--pipeline [NAME=]DIR ...] --prompts FILE
     --out DIR [annotator flags] [--images-per-prompt N] [--seed S] [--steps 50] [--guidance G]
     [--height H --width W] [--base NAME] [--bootstrap N] [--device auto] [--dtype auto]

Every pipeline draws image j of prompt i from the seed `seed + 1000 i + j` (a CPU generator
per image, so batching and device change nothing but rounding): the images of different
pipelines pair up by prompt and seed. DDIM with the pipeline's scheduler config; guidance
7.5 for SD1.5 and 5.0 for SDXL unless --guidance is given. Pipelines are sampled one after
the other, then each annotator is loaded once and scores every image, so one large model is
in memory at a time. Writes into OUT: images/NAME/PPPPP_JJ.png, scores.jsonl (one line per
image), summary.json, summary.md, grid.png. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from dde_tools import annotators as ann
from dde_tools import eval_report
from dde_tools.annotators import ToolError
from dde_tools.common import write_json_atomic

GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusionXLPipeline": 5.0}
MAX_IMAGES_PER_PROMPT = 1000  # the seed layout: seed + 1000 * prompt + image
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in GUIDANCE:
        raise ToolError(index, "unsupported pipeline class", f"one of {sorted(GUIDANCE)}", repr(class_name),
                        "Pass an SD1.5 or SDXL pipeline.")
    return Pipeline(name, path, class_name, GUIDANCE[class_name] if guidance is None else guidance)


def load_pipeline(pipeline: Pipeline, device: torch.device, dtype: torch.dtype):
    import diffusers

    cls = getattr(diffusers, pipeline.class_name)
    diffusers.utils.logging.set_verbosity_error()  # not "install accelerate" once per component
    diffusers.utils.logging.disable_progress_bar()
    try:
        pipe = cls.from_pretrained(pipeline.path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError, EnvironmentError) as err:
        raise ToolError(pipeline.path, f"cannot load a {pipeline.class_name}", "a complete diffusers folder",
                        f"{type(err).__name__}: {err}"[:300], "Check the folder's components.") from err
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample(pipeline: Pipeline, prompts: list[str], args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> list[dict]:
    """Draw every (prompt, image) of one pipeline into OUT/images/NAME; return one record each."""
    pipe = load_pipeline(pipeline, device, dtype)
    folder = args.out / "images" / pipeline.name
    folder.mkdir(parents=True, exist_ok=True)
    items = [(i, j) for i in range(len(prompts)) for j in range(args.images_per_prompt)]
    records = []
    for chunk in ann.batches(len(items), args.sample_batch_size):
        batch = items[chunk]
        seeds = [args.seed + MAX_IMAGES_PER_PROMPT * i + j for i, j in batch]
        output = pipe(prompt=[prompts[i] for i, _ in batch], num_inference_steps=args.steps,
                      guidance_scale=pipeline.guidance, height=args.height, width=args.width,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        nsfw = getattr(output, "nsfw_content_detected", None) or [None] * len(batch)
        for (i, j), seed, image, flagged in zip(batch, seeds, output.images, nsfw):
            relative = Path("images") / pipeline.name / f"{i:05d}_{j:02d}.png"
            image.save(args.out / relative)
            records.append({"model": pipeline.name, "prompt_index": i, "image_index": j, "seed": seed,
                            "prompt": prompts[i], "image": str(relative), "nsfw": flagged})
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def score(records: list[dict], spec: ann.AnnotatorSpec, out: Path, device: torch.device, batch_size: int) -> None:
    """Add the annotator's score to every record (key: the annotator's name)."""
    annotator = ann.load(spec, device)
    for chunk in ann.batches(len(records), batch_size):
        batch = records[chunk]
        images = [Image.open(out / r["image"]).convert("RGB") for r in batch]
        for record, value in zip(batch, annotator.score(images, [r["prompt"] for r in batch])):
            record[spec.name] = float(value)
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
    if args.guidance is not None and args.guidance < 0:
        raise ToolError("--guidance", "out of range", ">= 0", str(args.guidance), "Pass a non-negative scale.")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise ToolError(flag, "not a positive multiple of 8", "8, 16, ...", str(value), "Pass a multiple of 8.")


def write_outputs(records: list[dict], pipelines: list[Pipeline], specs: list[ann.AnnotatorSpec],
                  prompts: list[str], args: argparse.Namespace, base: str) -> str:
    """scores.jsonl, summary.json, summary.md and grid.png; return the markdown."""
    tmp = args.out / "scores.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, args.out / "scores.jsonl")
    names = [p.name for p in pipelines]
    summary = eval_report.summarize(records, names, [s.name for s in specs], base,
                                    (len(prompts), args.images_per_prompt), args.bootstrap, args.seed)
    settings = {"prompts": str(args.prompts), "num_prompts": len(prompts), "images_per_prompt": args.images_per_prompt,
                "seed": args.seed, "steps": args.steps, "scheduler": "DDIMScheduler",
                "height": args.height, "width": args.width,
                "pipelines": {p.name: {"path": str(p.path), "class": p.class_name, "guidance": p.guidance}
                              for p in pipelines},
                "annotators": {s.name: {"path": str(s.path), "arch": None if s.name == "pickscore" else s.arch,
                                        "unit": eval_report.UNITS[s.name]} for s in specs}}
    write_json_atomic(args.out / "summary.json", {"format": "dde-eval-summary", "version": 1,
                                                  "settings": settings} | summary)
    text = eval_report.markdown(summary, settings)
    shown = range(min(args.grid_prompts, len(prompts)))
    if shown:
        by_key = {(r["model"], r["prompt_index"]): r for r in records if r["image_index"] == 0}
        cells = [[Image.open(args.out / by_key[(m, i)]["image"]) for m in names] for i in shown]
        eval_report.image_grid(cells, names, args.grid_size).save(args.out / "grid.png")
        text += "\n![grid](grid.png)\n\nGrid rows (image 0 of each prompt):\n\n"
        text += "".join(f"{i + 1}. {prompts[i]}\n" for i in shown)
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    return text


def evaluate(args: argparse.Namespace) -> str:
    check_args(args)
    pipelines = [parse_pipeline(v, args.guidance) for v in args.pipeline]
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ToolError("--pipeline", "two pipelines share a name", "distinct names", str(names),
                        "Name them: --pipeline NAME=DIR.")
    base = args.base or names[0]
    if base not in names:
        raise ToolError("--base", "not one of the pipelines", str(names), repr(base), "Pass one of those names.")
    specs = ann.specs_from_args(args)
    if not specs:
        raise ToolError("annotator flags", "no annotator given", "--pickscore-model/--pickscore-processor, "
                        "--hps-checkpoint or --clip-weights", "none", "Name at least one annotator's files.")
    for spec in specs:
        ann.check(spec)  # before hours of sampling
    prompts = read_prompts(args.prompts, args.limit)
    device = ann.resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.float16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for pipeline in pipelines:
        start = time.perf_counter()
        records += sample(pipeline, prompts, args, device, dtype)
        print(f"evaluate: {pipeline.name}: {len(prompts) * args.images_per_prompt} images "
              f"(guidance {pipeline.guidance}, {args.steps} steps) in {time.perf_counter() - start:.1f} s", flush=True)
    for spec in specs:
        start = time.perf_counter()
        score(records, spec, args.out, device, args.score_batch_size)
        print(f"evaluate: scored with {spec.name} in {time.perf_counter() - start:.1f} s", flush=True)
    return write_outputs(records, pipelines, specs, prompts, args, base)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", required=True, help="[NAME=]DIR of a diffusers pipeline; repeat")
    p.add_argument("--prompts", type=Path, required=True, help="text file (one prompt a line) or parquet (caption)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
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
    ann.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(evaluate(args), end="")
    except ToolError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
