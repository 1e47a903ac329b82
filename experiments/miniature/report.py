"""Tables and figures of the miniature experiment from the per-run score files.

Each trained model m (a variant at one training seed) and the base are sampled on the same
held-out prompts with the same sampler seeds (dde_tools.evaluate's layout), so scores pair up:
M[s, p, j] (seed s, prompt p, image j) against B[p, j]. Per variant:
- mean score: mean of M;
- delta vs base: mean of M - B;
- win rate vs base: mean of (M > B) + 0.5 (M == B), as dde_tools.eval_report.win_rate;
- 95 % intervals: a two-level percentile bootstrap, resampling the training seeds and, inside,
  the prompts (the images of a prompt together), so both the seed-to-seed and the prompt-to-prompt
  spread are in the interval (with 3 seeds the seed level is coarse: read it as indicative).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dde_tools import plot_run  # noqa: E402

RESAMPLES = 2000


def hierarchical_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of values.mean() for values [S, P, N], resampling seeds, then prompts."""
    rng = np.random.default_rng(seed)
    seeds, prompts = values.shape[:2]
    per_prompt = values.mean(axis=2)  # [S, P]
    s_draw = rng.integers(0, seeds, size=(resamples, seeds))
    p_draw = rng.integers(0, prompts, size=(resamples, prompts))
    means = per_prompt[s_draw[:, :, None], p_draw[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize_variant(model: np.ndarray, base: np.ndarray) -> dict:
    """Mean, delta and win rate with intervals for model scores [S, P, N] against base [P, N]."""
    delta = model - base[None]
    outcome = (model > base[None]) + 0.5 * (model == base[None])
    return {
        "seeds": int(model.shape[0]),
        "images": int(model.size),
        "mean": float(model.mean()),
        "delta": float(delta.mean()),
        "delta_ci95": hierarchical_interval(delta),
        "win_rate": float(outcome.mean()),
        "win_ci95": hierarchical_interval(outcome),
        "delta_per_seed": [float(d) for d in delta.mean(axis=(1, 2))],
    }


def summarize(base: np.ndarray, runs: dict[str, list[np.ndarray]]) -> dict:
    """Per variant name: summarize_variant over its finished seeds."""
    return {name: summarize_variant(np.stack(tables), base) for name, tables in runs.items() if tables}


def _row(name: str, entry: dict, extra: str) -> str:
    delta_low, delta_high = entry["delta_ci95"]
    win_low, win_high = entry["win_ci95"]
    per_seed = ", ".join(f"{d:+.4f}" for d in entry["delta_per_seed"])
    return (f"| {name} | {entry['mean']:.4f} | {entry['delta']:+.4f} [{delta_low:+.4f}, {delta_high:+.4f}] | "
            f"{entry['win_rate']:.3f} [{win_low:.3f}, {win_high:.3f}] | {entry['seeds']} | {per_seed} | {extra} |")


def markdown_table(summary: dict, names: Sequence[str], base_mean: float, first: str,
                   foreground: dict[str, str]) -> str:
    """One row per variant (in `names` order, those with results), the base first; `foreground`:
    the last column's text per name (and "base"): named / empty quadrant score / foreground."""
    lines = [f"| {first} | mean score | Δ vs base [95 % CI] | win rate vs base [95 % CI] | seeds | Δ per seed "
             "| named / empty / foreground |",
             "| --- | ---: | --- | --- | ---: | --- | --- |",
             f"| base | {base_mean:.4f} | - | - | - | - | {foreground.get('base', '-')} |"]
    lines += [_row(name, summary[name], foreground.get(name, "-")) for name in names if name in summary]
    return "\n".join(lines) + "\n"


def _panel_figure(run_dirs: dict[str, list[Path]], path: Path, draw) -> Path:
    """One panel per variant that has runs (three a row); `draw(ax, name, dirs)` fills a panel."""
    names = [n for n, dirs in run_dirs.items() if dirs]
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        draw(ax, name, run_dirs[name])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def credit_figure(run_dirs: dict[str, list[Path]], path: Path, bins: int = 20) -> Path:
    """Mean credit weight k_t sigmoid(-z) binned by t, one panel per variant (seeds pooled)."""

    def draw(ax, name: str, dirs: list[Path]) -> None:
        pairs = [p for d in dirs for p in plot_run.read_records(d)["pair"] if p.get("credit") is not None]
        if pairs:
            t = np.asarray([p["t"] for p in pairs], dtype=np.float64)
            credit = np.asarray([p["credit"] for p in pairs], dtype=np.float64)
            centers, means = plot_run.binned_mean(t, credit, 1000, bins)
            ax.bar(centers, np.nan_to_num(means), width=1000 / bins * 0.9)
        ax.set(title=name, xlabel="t", ylabel="credit k_t sigmoid(-z)", xlim=(0, 1000))

    return _panel_figure(run_dirs, path, draw)


def correction_figure(run_dirs: dict[str, list[Path]], path: Path, cumulative: bool = False) -> Path:
    """The correction array E over t at the end of training (with `cumulative`: the correction
    C_t = sum over k > t of E[k] that enters z), one line per seed, one panel per variant."""

    def draw(ax, name: str, dirs: list[Path]) -> None:
        for d in dirs:
            correction = plot_run.latest_correction(d)
            if correction is not None:
                E = np.asarray(correction["E"], dtype=np.float64)
                values = np.concatenate([np.cumsum(E[::-1])[::-1][1:], [0.0]]) if cumulative else E
                ax.plot(values, linewidth=0.8)
        ax.set(title=name, xlabel="t", ylabel="C_t" if cumulative else "E[t]", xlim=(0, 1000))

    return _panel_figure(run_dirs, path, draw)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
