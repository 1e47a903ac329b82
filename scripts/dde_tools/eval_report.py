"""What dde_tools.evaluate reports: means and medians, win rates with bootstrap intervals, a grid.

Win rate of a model against the base, for one annotator: over the (prompt, seed) pairings,
1 when the model's image scores higher than the base's image of the same prompt and seed,
0.5 when equal, 0 when lower, averaged. Its 95 % interval is the percentile bootstrap over
prompts (the images of one prompt are resampled together, since they share the prompt),
`resamples` draws from numpy's default_rng(seed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

UNITS = {"pickscore": "logit_scale x cos", "hps": "cos (hpsv2)", "clip": "max(100 cos, 0)"}


def score_table(records: Sequence[dict], model: str, annotator: str, shape: tuple[int, int]) -> np.ndarray:
    """The model's scores as [prompts, images per prompt]."""
    table = np.full(shape, np.nan)
    for r in records:
        if r["model"] == model:
            table[r["prompt_index"], r["image_index"]] = r[annotator]
    return table


def bootstrap_interval(per_prompt: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of `per_prompt` [P], resampling prompts."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_prompt), size=(resamples, len(per_prompt)))
    means = per_prompt[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def win_rate(model: np.ndarray, base: np.ndarray, resamples: int, seed: int) -> dict:
    """Win rate of `model` over `base` (both [P, N], paired by prompt and seed) with its interval."""
    outcome = (model > base) + 0.5 * (model == base)
    low, high = bootstrap_interval(outcome.mean(axis=1), resamples, seed)
    return {"win_rate": float(outcome.mean()), "ci95": [low, high], "wins": int((model > base).sum()),
            "ties": int((model == base).sum()), "losses": int((model < base).sum()), "pairs": int(outcome.size)}


def summarize(records: Sequence[dict], models: Sequence[str], annotators: Sequence[str], base: str,
              shape: tuple[int, int], resamples: int, seed: int) -> dict:
    """Per model and annotator: mean, median; per other model: win rate against `base`."""
    result: dict = {"base": base, "bootstrap": {"resamples": resamples, "seed": seed, "unit": "prompt"},
                    "models": {}}
    for model in models:
        entry: dict = {}
        for annotator in annotators:
            scores = score_table(records, model, annotator, shape)
            entry[annotator] = {"images": int(scores.size), "mean": float(scores.mean()),
                                "median": float(np.median(scores)), "std": float(scores.std())}
            if model != base:
                base_scores = score_table(records, base, annotator, shape)
                entry[annotator]["vs_base"] = win_rate(scores, base_scores, resamples, seed)
        result["models"][model] = entry
    return result


def markdown(summary: dict, settings: dict) -> str:
    """The summary as markdown: one table per annotator."""
    lines = ["# dde evaluation", "", f"Prompts: {settings['prompts']} ({settings['num_prompts']}), "
             f"{settings['images_per_prompt']} images per prompt, seeds {settings['seed']} + 1000 x prompt + image; "
             f"DDIM {settings['steps']} steps. Win rate: against `{summary['base']}` on the same prompt and seed, "
             f"ties count 1/2; 95 % interval: bootstrap over prompts ({summary['bootstrap']['resamples']} draws).", ""]
    lines += [f"| model | pipeline | guidance |", "| --- | --- | --- |"]
    lines += [f"| {m} | `{p['path']}` | {p['guidance']} |" for m, p in settings["pipelines"].items()]
    annotators = next(iter(summary["models"].values())).keys()
    for annotator in annotators:
        lines += ["", f"## {annotator} ({UNITS[annotator]})", "",
                  "| model | images | mean | median | win rate vs base | 95 % CI |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for model, entry in summary["models"].items():
            row = entry[annotator]
            wins = row.get("vs_base")
            win = f"{wins['win_rate']:.3f} | [{wins['ci95'][0]:.3f}, {wins['ci95'][1]:.3f}]" if wins else "- | -"
            lines.append(f"| {model} | {row['images']} | {row['mean']:.4f} | {row['median']:.4f} | {win} |")
    return "\n".join(lines) + "\n"


def image_grid(cells: Sequence[Sequence[Image.Image]], labels: Sequence[str], size: int) -> Image.Image:
    """Rows of images (one row per prompt, one column per model) under a header of labels."""
    header = 16
    grid = Image.new("RGB", (size * len(labels), header + size * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * size + 4, 2), label, fill="black")
    for row, images in enumerate(cells):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((size, size)), (column * size, header + row * size))
    return grid
