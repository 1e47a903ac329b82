"""What dde_tools.evaluate reports: means and medians, win rates with bootstrap intervals, a grid.

Win rate of a model against the base, for one annotator: over the (prompt, seed) pairings,
1 when the model's image scores higher than the base's image of the same prompt and seed,
0.5 when equal, 0 when lower, averaged. Its 95 % interval is the percentile bootstrap over
prompts (the images of one prompt are resampled together, since they share the prompt),
`resamples` draws from numpy's default_rng(seed).

An image without a score (non-finite pixels, or a non-finite score: None in the records) counts
in no mean, and a pairing where either side has none counts in no win rate (`excluded_pairs`);
with no pairing left the win rate is None ("n/a"), never a win.
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
        if r["model"] == model and r.get(annotator) is not None:
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
    """Win rate of `model` over `base` (both [P, N], paired by prompt and seed; NaN = no score) with
    its interval, over the pairings where both have a score."""
    valid = np.isfinite(model) & np.isfinite(base)
    pairs, excluded = int(valid.sum()), int(valid.size - valid.sum())
    wins, ties = int((model > base)[valid].sum()), int((model == base)[valid].sum())
    counts = {"wins": wins, "ties": ties, "losses": pairs - wins - ties, "pairs": pairs, "excluded_pairs": excluded}
    if pairs == 0:
        return {"win_rate": None, "ci95": None} | counts
    outcome = np.where(valid, (model > base) + 0.5 * (model == base), np.nan)
    prompts = valid.any(axis=1)
    low, high = bootstrap_interval(np.nanmean(outcome[prompts], axis=1), resamples, seed)
    return {"win_rate": float(np.nanmean(outcome)), "ci95": [low, high]} | counts


def _stats(scores: np.ndarray) -> dict:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return {"images": int(scores.size), "scored": 0, "mean": None, "median": None, "std": None}
    return {"images": int(scores.size), "scored": int(finite.size), "mean": float(finite.mean()),
            "median": float(np.median(finite)), "std": float(finite.std())}


def summarize(records: Sequence[dict], models: Sequence[str], annotators: Sequence[str], base: str,
              shape: tuple[int, int], resamples: int, seed: int) -> dict:
    """Per model and annotator: mean, median; per other model: win rate against `base`."""
    result: dict = {"base": base, "bootstrap": {"resamples": resamples, "seed": seed, "unit": "prompt"},
                    "models": {}}
    for model in models:
        entry: dict = {}
        for annotator in annotators:
            scores = score_table(records, model, annotator, shape)
            entry[annotator] = _stats(scores)
            if model != base:
                base_scores = score_table(records, base, annotator, shape)
                entry[annotator]["vs_base"] = win_rate(scores, base_scores, resamples, seed)
        result["models"][model] = entry
    return result


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _flag_lines(flags: Sequence[str]) -> list[str]:
    return ["", *(f"**Flagged:** {line}." for line in flags)] if flags else []


def _header(settings: dict) -> list[str]:
    lines = [f"| model | pipeline | guidance |", "| --- | --- | --- |"]
    return lines + [f"| {m} | `{p['path']}` | {p['guidance']} |" for m, p in settings["pipelines"].items()]


def markdown(summary: dict, settings: dict, flags: Sequence[str] = ()) -> str:
    """The summary as markdown: one table per annotator, the flags first."""
    lines = ["# dde evaluation", "", f"Prompts: {settings['prompts']} ({settings['num_prompts']}), "
             f"{settings['images_per_prompt']} images per prompt, seeds {settings['seed']} + 1000 x prompt + image; "
             f"DDIM {settings['steps']} steps. Win rate: against `{summary['base']}` on the same prompt and seed, "
             f"ties count 1/2; 95 % interval: bootstrap over prompts ({summary['bootstrap']['resamples']} draws).",
             *_flag_lines(flags), ""]
    lines += _header(settings)
    annotators = next(iter(summary["models"].values())).keys()
    for annotator in annotators:
        lines += ["", f"## {annotator} ({UNITS[annotator]})", "",
                  "| model | images | mean | median | win rate vs base | 95 % CI |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for model, entry in summary["models"].items():
            row = entry[annotator]
            wins = row.get("vs_base")
            if wins and wins["win_rate"] is not None:
                win = f"{wins['win_rate']:.3f} | [{wins['ci95'][0]:.3f}, {wins['ci95'][1]:.3f}]"
            else:
                win = "n/a (no scored pair) | -" if wins else "- | -"
            images = f"{row['images']}" if row["scored"] == row["images"] else f"{row['scored']} of {row['images']}"
            lines.append(f"| {model} | {images} | {_number(row['mean'], 4)} | {_number(row['median'], 4)} | {win} |")
    return "\n".join(lines) + "\n"


def sample_markdown(settings: dict, flags: Sequence[str] = ()) -> str:
    """What --sample-only reports: the settings, no scores."""
    lines = ["# dde samples (not scored: --sample-only)", "", f"Prompts: {settings['prompts']} "
             f"({settings['num_prompts']}), {settings['images_per_prompt']} images per prompt, seeds "
             f"{settings['seed']} + 1000 x prompt + image; DDIM {settings['steps']} steps. Run again with "
             "annotator flags to score these images (they are reused).", *_flag_lines(flags), ""]
    return "\n".join(lines + _header(settings)) + "\n"


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
