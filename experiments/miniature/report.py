"""Tables and figures of the miniature experiment (v3) from the per-run score files.

Each trained model m (a variant at one training seed) and the base are sampled on the same
prompts with the same sampler seeds (dde_tools.evaluate's layout), so scores pair up:
M[s, p, j] (seed s, prompt p, image j) against B[p, j]; two variants A, B at the same seed s
pair up image by image (same prompts, same sampler noise, same data order and t draws). Per
variant and annotator:
- mean score: mean of M;
- delta vs base: mean of M - B;
- win rate vs base: mean of (M > B) + 0.5 (M == B), as dde_tools.eval_report.win_rate;
- a paired difference A - B: mean of A[s] - B[s] over the seeds both finished.
95 % intervals: a two-level percentile bootstrap, resampling the training seeds and, inside, the
prompts (the images of a prompt together), so both the seed-to-seed and the prompt-to-prompt
spread are in the interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

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


# --- v2: both annotators, paired contrasts, the sweep, held-out ranking, credit heat maps --------


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b ([S, P, N] each, paired by seed) with its two-level bootstrap interval."""
    delta = a - b
    return {"delta": float(delta.mean()), "ci95": hierarchical_interval(delta), "seeds": int(a.shape[0]),
            "per_seed": [float(d) for d in delta.mean(axis=(1, 2))]}


def summarize_v2(base: dict, runs: dict[str, list[Path]], annotators: Sequence[str],
                 contrasts: Sequence[tuple[str, str]], load: Callable, split: str) -> dict:
    """Per variant and annotator: summarize_variant against the base; per contrast (a, b) and
    annotator: paired_difference over the seeds both have. `load(folders, split, key)` gives
    [S, P, N]; base[split][key] is [P, N]."""
    variants, pairs = {}, {}
    seeds_of = {name: {d.name: d for d in dirs} for name, dirs in runs.items() if dirs}
    for name, dirs in runs.items():
        if dirs:
            variants[name] = {a: summarize_variant(load(dirs, split, a), np.asarray(base[split][a]))
                              for a in annotators}
            variants[name]["named"] = summarize_variant(load(dirs, split, "named"), np.asarray(base[split]["named"]))
    for a_name, b_name in contrasts:
        common = sorted(set(seeds_of.get(a_name, {})) & set(seeds_of.get(b_name, {})))
        if common:
            pairs[f"{a_name} - {b_name}"] = {
                a: paired_difference(load([seeds_of[a_name][k] for k in common], split, a),
                                     load([seeds_of[b_name][k] for k in common], split, a))
                for a in annotators}
    base_means = {sp: {k: float(np.mean(v)) for k, v in base[sp].items()} for sp in base if isinstance(base[sp], dict)}
    return {"split": split, "base": base_means, "variants": variants, "contrasts": pairs}


def held_out_summary(evals: Sequence[dict | None]) -> dict | None:
    """Mean over seeds of the last held-out evaluation: implicit accuracy, misranked fraction by t."""
    evals = [e for e in evals if e is not None]
    if not evals:
        return None
    misranked = np.asarray([[np.nan if v is None else v for v in e["misranked_by_t"]] for e in evals])
    return {"runs": len(evals), "step": evals[0]["step"], "t_bins": evals[0]["t_bins"],
            "implicit_acc": float(np.mean([e["implicit_acc"] for e in evals])),
            "misranked_by_t": np.nanmean(misranked, axis=0).tolist()}


def training_ranking(step_records: Sequence[dict], last: int) -> dict | None:
    """Over the last `last` step records: the fraction of training pairs misranked (Delta > 0) per
    10 bins of t (pairs pooled over the steps) and the pair count per bin."""
    steps = [r for r in step_records if isinstance(r.get("t_bins"), dict)][-last:]
    if not steps:
        return None
    pairs = np.asarray([r["t_bins"]["pairs"] for r in steps], dtype=np.float64)
    misranked = np.asarray([[np.nan if v is None else v for v in r["t_bins"]["misranked"]] for r in steps])
    counts = np.where(np.isnan(misranked), 0.0, misranked * pairs).sum(axis=0)
    total = np.where(np.isnan(misranked), 0.0, pairs).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = counts / total
    return {"steps": len(steps), "pairs_by_bin": total.astype(int).tolist(),
            "misranked_by_bin": [None if np.isnan(f) else float(f) for f in fraction],
            "misranked": float(counts.sum() / total.sum()) if total.sum() else None}


def sweep_rows(scores_by_job: Sequence[tuple[str, float, float, float, int, dict]],
               annotators: Sequence[str]) -> list[dict]:
    """One row per scored sweep checkpoint (variant, lr, beta, epochs, seed, its validation
    scores): the means."""
    return [{"variant": name, "lr": lr, "beta": beta, "epochs": epochs, "seed": seed,
             **{a: float(np.mean(val[a])) for a in annotators}, "named": float(np.mean(val["named"]))}
            for name, lr, beta, epochs, seed, val in scores_by_job]


def interval(entry: dict) -> dict:
    """{mean, lo, hi} of a summarize_variant entry's delta (results-v3.json's form)."""
    return {"mean": entry["delta"], "lo": entry["delta_ci95"][0], "hi": entry["delta_ci95"][1]}


def _ci(entry: dict, key: str = "delta", ci: str = "delta_ci95", spec: str = "+.3f") -> str:
    low, high = entry[ci]
    return f"{entry[key]:{spec}} [{low:{spec}}, {high:{spec}}]"


def _base_lines(results: dict, annotators: Sequence[str]) -> list[str]:
    lines = ["## The base", "", "| prompts | named quadrants | " + " | ".join(annotators) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in annotators) + " |"]
    for split, means in results["base"].items():
        lines.append(f"| {split} | {means['named']:.3f} | " + " | ".join(f"{means[a]:.3f}" for a in annotators) + " |")
    return lines + [""]


def _sweep_lines(results: dict, annotators: Sequence[str], labeller: str) -> list[str]:
    lines = [f"## Sweep (first seed, validation prompts; the best {labeller} mean is chosen)", "",
             "| variant | lr | beta | epochs | " + " | ".join(annotators) + " | named | chosen |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in annotators) + " | ---: | --- |"]
    chosen = results["chosen"]
    for row in results["sweep"]:
        pick = chosen.get(row["variant"], {})
        same = (pick.get("lr"), pick.get("beta"), pick.get("epochs")) == (row["lr"], row["beta"], row["epochs"])
        mark = "yes" if same else ""
        lines.append(f"| {row['variant']} | {row['lr']:g} | {row['beta']:g} | {row['epochs']:g} | "
                     + " | ".join(f"{row[a]:.3f}" for a in annotators) + f" | {row['named']:.3f} | {mark} |")
    return lines + [""]


def _variant_lines(results: dict, names: Sequence[str], annotators: Sequence[str]) -> list[str]:
    split, base, held = results["split"], results["base"], results.get("held_out", {})
    lines = [f"## Every variant at its setting ({split} prompts; Δ vs the base with 95 % CI over seeds and "
             "prompts; drift: rise of the denoising error on held-out images over the base's "
             f"{results['base_denoising_error']:.5f})", "",
             "| variant | lr | beta | epochs | seeds | " + " | ".join(f"{a} | Δ {a}" for a in annotators)
             + f" | named | Δ named | win rate vs base ({annotators[0]}) | drift | c_t_final | held-out acc |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---" for _ in annotators)
             + " | ---: | --- | --- | ---: | ---: | ---: |",
             "| base | | | | | " + " | ".join(f"{base[split][a]:.3f} |" for a in annotators)
             + f" | {base[split]['named']:.3f} | | | | | |"]
    for name in [n for n in names if n in results["variants"]]:
        v, acc, setting = results["variants"][name], held.get(name), results["settings_of"][name]
        c_t = "-" if v.get("c_t_final") is None else f"{v['c_t_final']:.2e}"
        lines.append(f"| {name} | {setting['lr']:g} | {setting['beta']:g} | {setting['epochs']:g} | "
                     f"{v[annotators[0]]['seeds']} | "
                     + " | ".join(f"{v[a]['mean']:.3f} | {_ci(v[a])}" for a in annotators)
                     + f" | {v['named']['mean']:.3f} | {_ci(v['named'])}"
                     + f" | {_ci(v[annotators[0]], 'win_rate', 'win_ci95', '.3f')} | {v['drift']:+.5f} | {c_t} | "
                     + (f"{acc['implicit_acc']:.3f}" if acc else "-") + " |")
    return lines + [""]


def _contrast_lines(results: dict, annotators: Sequence[str]) -> list[str]:
    lines = ["## Paired differences (same seeds, prompts and sampler noise; 95 % CI over seeds and prompts)", "",
             "| difference | seeds | " + " | ".join(f"Δ {a}" for a in annotators) + " |",
             "| --- | ---: | " + " | ".join("---" for _ in annotators) + " |"]
    for key, entry in results["contrasts"].items():
        lines.append(f"| {key} | {entry[annotators[0]]['seeds']} | "
                     + " | ".join(_ci(entry[a], "delta", "ci95") for a in annotators) + " |")
    return lines + [""]


def _held_out_lines(results: dict, names: Sequence[str]) -> list[str]:
    held = results.get("held_out", {})
    rows = [(n, held[n]) for n in names if held.get(n)]
    if not rows:
        return []
    bins = rows[0][1]["t_bins"]
    lines = ["## Held-out pairs at the end of training: fraction misranked (Delta > 0) by t (mean over seeds)", "",
             "| variant | implicit acc | " + " | ".join(f"t={t}" for t in bins) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in bins) + " |"]
    for name, h in rows:
        lines.append(f"| {name} | {h['implicit_acc']:.3f} | "
                     + " | ".join("-" if np.isnan(m) else f"{m:.2f}" for m in h["misranked_by_t"]) + " |")
    train = results.get("training_ranking", {})
    rows = [(n, train[n]) for n in names if train.get(n)]
    if rows:
        lines += ["", "## Training pairs over the last epoch: fraction misranked (Delta > 0) by bin of t "
                  "(seeds pooled; the paper's regime needs it near 0)", "",
                  "| variant | all t | " + " | ".join(f"{100 * k}-{100 * k + 99}" for k in range(10)) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in range(10)) + " |"]
        for name, r in rows:
            overall = "-" if r["misranked"] is None else f"{r['misranked']:.2f}"
            lines.append(f"| {name} | {overall} | "
                         + " | ".join("-" if m is None else f"{m:.2f}" for m in r["misranked_by_bin"]) + " |")
    return lines + [""]


def _pair_lines(results: dict) -> list[str]:
    lines = ["## Pairs (the best and the worst of K base samples per prompt)", "",
             "| set | prompts | labels | sample score mean | pair gap mean | pair gap median |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for name, st in results.get("pairs", {}).items():
        lines.append(f"| {name} | {st['prompts']} | {st['labels']} | {st['sample_score_mean']:.3f} | "
                     f"{st['pair_gap_mean']:.3f} | {st['pair_gap_median']:.3f} |")
    return lines + [""]


def markdown_v3(results: dict, names: Sequence[str], annotators: Sequence[str], labeller: str) -> str:
    """results.md: the base, the pairs, the sweep, every variant, the paired differences, ranking by t."""
    lines = [f"# Miniature world v3: results ({results['split']} prompts)", ""]
    lines += _base_lines(results, annotators) + _pair_lines(results) + _sweep_lines(results, annotators, labeller)
    lines += _variant_lines(results, names, annotators) + _contrast_lines(results, annotators)
    lines += _held_out_lines(results, names)
    return "\n".join(lines)


def gain_vs_drift(results: dict, labeller: str, path: Path) -> Path:
    """Reward against drift: per variant, the test gain of the labeller's score over the base
    (with its 95 % interval) against the rise of the denoising error on held-out images (the
    spread over seeds as a bar). A method is better only if it gains more at equal drift."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, v) in enumerate(results["variants"].items()):
        if "drift" not in v:
            continue
        gain, (low, high) = v[labeller]["delta"], v[labeller]["delta_ci95"]
        spread = v["drift_by_seed"]
        ax.errorbar(v["drift"], gain, yerr=[[gain - low], [high - gain]],
                    xerr=[[v["drift"] - min(spread)], [max(spread) - v["drift"]]], fmt="o", ms=5, capsize=3,
                    color=plt.cm.tab10(k % 10), label=name)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel="drift: denoising error on held-out images - base's", ylabel=f"Δ {labeller} vs base (test)",
           title="gain against drift")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def credit_heatmaps(run_dirs: dict[str, list[Path]], path: Path) -> Path:
    """Mean credit k_t sigmoid(-z) by t-bin (rows) and optimizer step (columns), the step records'
    t_bins averaged over seeds; one panel per variant."""

    def draw(ax, name: str, dirs: list[Path]) -> None:
        grids = []
        for d in dirs:
            steps = [r for r in plot_run.read_records(d)["step"] if isinstance(r.get("t_bins"), dict)]
            grids.append([[np.nan if v is None else v for v in r["t_bins"]["credit"]] for r in steps])
        length = min(len(g) for g in grids)
        if length:
            with np.errstate(all="ignore"):
                grid = np.nanmean(np.asarray([g[:length] for g in grids], dtype=np.float64), axis=0).T
            image = ax.imshow(grid, aspect="auto", origin="lower", extent=(0.5, length + 0.5, 0, 1000),
                              interpolation="nearest", cmap="viridis")
            plt.colorbar(image, ax=ax)
        ax.set(title=name, xlabel="optimizer step", ylabel="t")

    return _panel_figure(run_dirs, path, draw)


def _misranked(evals: list[dict], which: int) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in e[which]["misranked_by_t"]] for e in evals])


def misranked_by_t(run_dirs: dict[str, list[Path]], path: Path) -> Path:
    """Held-out fraction misranked by t at the end of training, seeds averaged (dashed: step 0)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    first = None
    for k, (name, dirs) in enumerate((n, d) for n, d in run_dirs.items() if d):
        evals = [e for e in (plot_run.read_records(d)["eval"] for d in dirs) if e]
        if evals:
            t = evals[0][-1]["t_bins"]
            with np.errstate(all="ignore"):
                ax.plot(t, np.nanmean(_misranked(evals, -1), axis=0), "-o", ms=3, lw=1, label=name,
                        color=plt.cm.tab20(k % 20))
                first = (t, np.nanmean(_misranked(evals, 0), axis=0)) if first is None else first
    if first is not None:
        ax.plot(*first, "k--", lw=1.5, label="base (step 0)")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set(xlabel="t", ylabel="fraction misranked (Delta > 0)", title="held-out pairs, end of training")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def samples_grid(folder: Path, models: Sequence[tuple[str, str]], rows: int, path: Path) -> Path:
    """Image 0 of the first `rows` prompts of folder/images/<model>/, one column per (label, model)."""
    from PIL import Image

    from dde_tools import eval_report

    cells = [[Image.open(folder / "images" / m / f"{i:05d}_00.png") for _, m in models] for i in range(rows)]
    labels = [label.replace("calibrated", "cal").replace("uniform", "uni") for label, _ in models]
    eval_report.image_grid(cells, labels, 64).quantize(colors=128).save(path, optimize=True)
    return path
