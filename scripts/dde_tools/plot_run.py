"""Turn a dde_train run directory into PNG figures.

    python -m dde_tools.plot_run RUN_DIR [--out RUN_DIR/figures]

Figures:
- ``training.png``: loss and implicit accuracy over optimizer steps;
- ``correction.png``: the correction array E over t (newest checkpoint's correction_ema.json);
- ``credit.png``: the credit weight k_t * sigmoid(-z) binned by t (docs/method.md §5),
  from the per-pair records (config ``logging.per_sample: true``);
- ``eval.png``: held-out implicit accuracy (fraction of pairs with Delta < 0) and the method's loss
  over steps, per t bin and overall, from the ``kind: eval`` records (config ``data.eval_index``).

A record that does not parse or lacks a field is an error naming the file and line (exit 2); a
last line cut short (the run is writing it) is skipped. The figures folder must be absent, empty
or an earlier plot_run output (common.MARKER); each figure is written as NAME.tmp and renamed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dde_tools.common import ToolError, check_output, run_main, write_marker  # noqa: E402

TOOL = "plot_run"
FIGURES = ("training.png", "correction.png", "credit.png", "eval.png", "t_bins.png")
# Fields each kind of record must carry (as dde_train writes them), with their types.
NUMBER = (int, float)
REQUIRED = {
    "step": {"step": int, "loss": NUMBER},
    "pair": {"t": NUMBER},
    "eval": {"step": int, "t_bins": list, "implicit_acc_by_t": list, "loss_by_t": list, "implicit_acc": NUMBER,
             "loss": NUMBER, "pairs": int, "method": str},
}


def _check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise ToolError(where, "not a JSON object", "one metrics record a line", type(record).__name__,
                        "Fix or remove the line.")
    for key, kind in REQUIRED.get(record.get("kind", "step"), {}).items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ToolError(where, f"a {record.get('kind', 'step')} record without a valid {key!r}",
                            f"{key} of type {getattr(kind, '__name__', 'number')}", repr(value)[:60],
                            "Fix or remove the line (was metrics.jsonl written by another program?).")
    if record.get("kind") == "eval" and not len(record["t_bins"]) == len(record["implicit_acc_by_t"]) == \
            len(record["loss_by_t"]):
        raise ToolError(where, "an eval record whose per-t lists differ in length", "equal lengths",
                        f"{len(record['t_bins'])}, {len(record['implicit_acc_by_t'])}, {len(record['loss_by_t'])}",
                        "Fix or remove the line.")


def read_records(run_dir: Path) -> dict[str, list[dict]]:
    """The records of ``metrics.jsonl`` by kind ("step", "pair", "eval")."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_run: {path} not found: is {run_dir} a dde_train run directory?")
    by_kind: dict[str, list[dict]] = {"step": [], "pair": [], "eval": []}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ToolError(path, "not UTF-8 text", "JSON lines", str(err)[:120], "Pass a dde_train run folder.") from err
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                print(f"plot_run: {path}:{number}: skipping a last line cut short (the run is writing it)",
                      file=sys.stderr)
                continue
            raise ToolError(f"{path}:{number}", "a line that is not JSON", "one JSON object a line", str(err),
                            "Fix or remove the line.") from err
        _check_record(record, f"{path}:{number}")
        by_kind.setdefault(record.get("kind", "step"), []).append(record)
    return by_kind


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Step records and per-pair records of ``metrics.jsonl``."""
    records = read_records(run_dir)
    return records["step"], records["pair"]


def latest_correction(run_dir: Path) -> dict | None:
    """correction_ema.json of the newest complete checkpoint, if any."""
    complete = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    if not complete:
        return None
    path = complete[-1] / "correction_ema.json"
    try:
        correction = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ToolError(path, "cannot read the correction array", "JSON with step and E", str(err)[:160],
                        "The checkpoint is damaged; plot an earlier run or remove that step.") from err
    if not isinstance(correction, dict) or not isinstance(correction.get("E"), list) or \
            not all(isinstance(e, (int, float)) and math.isfinite(e) for e in correction["E"]) or \
            not isinstance(correction.get("step"), int):
        raise ToolError(path, "not a correction array", "{\"step\": N, \"E\": [finite numbers]}",
                        str(correction)[:80], "The checkpoint is damaged; remove that step or plot another run.")
    return correction


def binned_mean(t: np.ndarray, values: np.ndarray, num_timesteps: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` in ``bins`` equal-width bins of t (NaN where a bin is empty)."""
    edges = np.linspace(0, num_timesteps, bins + 1)
    index = np.clip(np.digitize(t, edges) - 1, 0, bins - 1)
    sums = np.bincount(index, weights=values, minlength=bins)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (edges[:-1] + edges[1:]) / 2, sums / counts


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _legacy_output(folder: Path) -> bool:
    """Figures written before the output marker: only figure files."""
    return all(name in FIGURES for name in os.listdir(folder))


def plot_run(run_dir: Path, out_dir: Path, bins: int = 20) -> list[Path]:
    if bins < 1:
        raise ToolError("--bins", "out of range", ">= 1", str(bins), "Pass a positive number of t bins.")
    records = read_records(run_dir)
    steps, pairs = records["step"], records["pair"]
    check_output(TOOL, out_dir, inputs=[run_dir], own_patterns=(*FIGURES, "*.tmp"), legacy=_legacy_output)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, TOOL, FIGURES)
    written = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [r["step"] for r in steps]
    loss = np.asarray([r["loss"] for r in steps], dtype=np.float64)
    ax_loss.plot(x, loss, color="C0", alpha=0.25, lw=0.8, label="per step")
    ax_loss.plot(x, ema(loss), color="C0", lw=2, label=f"EMA ({EMA_WEIGHT})")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    if steps:
        ax_loss.legend(fontsize=7)
    acc = np.asarray([np.nan if r.get("implicit_acc") is None else r["implicit_acc"] for r in steps])
    if np.isfinite(acc).any():
        ax_acc.plot(x, acc, color="C1", alpha=0.25, lw=0.8)
        ax_acc.plot(x, ema(acc), color="C1", lw=2)
    ax_acc.set(xlabel="optimizer step", ylabel="implicit accuracy", title="implicit accuracy (the method's z > 0)",
               ylim=(-0.05, 1.05))
    written.append(_save(fig, out_dir / "training.png"))
    written.append(plot_t_bins(steps, out_dir / "t_bins.png"))

    correction = latest_correction(run_dir)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if correction is not None:
        E = np.asarray(correction["E"], dtype=np.float64)
        C = np.concatenate([np.cumsum(E[::-1])[::-1][1:], [0.0]])  # C_t = sum_{k>t} E[k]
        ax.plot(np.arange(E.size), E, lw=1, label="E[t]")
        ax.plot(np.arange(E.size), C, lw=2, label="C_t")
        # E spans orders of magnitude (largest at small t): a symmetric log scale shows its shape.
        scale = float(np.abs(np.concatenate([E, C])).max()) if E.size else 0.0
        if scale > 0:
            ax.set_yscale("symlog", linthresh=scale * 1e-4)
        ax.legend(fontsize=7)
        ax.set_title(f"correction E and C_t over t (step {correction['step']})")
    else:
        ax.set_title("correction E: no checkpoint yet")
    ax.set(xlabel="t", ylabel="E[t]")
    written.append(_save(fig, out_dir / "correction.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    usable = [p for p in pairs if p.get("credit") is not None]
    if usable:
        num_timesteps = len(correction["E"]) if correction is not None else 1000
        t = np.asarray([p["t"] for p in usable], dtype=np.float64)
        credit = np.asarray([p["credit"] for p in usable], dtype=np.float64)
        centers, means = binned_mean(t, credit, num_timesteps, bins)
        ax.bar(centers, np.nan_to_num(means), width=num_timesteps / bins * 0.9)
        ax.set_title("credit weight k_t sigmoid(-z) by t")
    else:
        ax.set_title("credit: no per-pair records (logging.per_sample)")
    ax.set(xlabel="t", ylabel="mean credit weight")
    written.append(_save(fig, out_dir / "credit.png"))
    written.append(plot_eval(records["eval"], out_dir / "eval.png"))
    return written


EMA_WEIGHT = 0.9


def ema(values: np.ndarray, weight: float = EMA_WEIGHT) -> np.ndarray:
    """TensorBoard-style smoothing, debiased at the start; NaN entries are skipped."""
    out = np.full(values.shape, np.nan)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = weight * acc + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        if norm > 0:
            out[i] = acc / norm
    return out


MIN_PAIRS_PER_CELL = 32  # t_bins.png pools steps into windows until an average cell holds this many pairs


def t_bin_windows(steps: list[dict], min_pairs: int = MIN_PAIRS_PER_CELL) -> dict:
    """The step records' t_bins pooled into windows of consecutive steps, so that a cell (window x
    bin of t) holds on average at least `min_pairs` pairs: a step of 4 pairs spreads them over 10
    bins, and one step's cell is mostly empty or one pair. Per window and bin: the pair count, and
    the pair-weighted means of credit and misranked (None where the window's bin has no pairs, or
    the value is undefined, e.g. misranked without a reference). Windows split at nothing else: the
    last one may be shorter."""
    rows = [r for r in steps if isinstance(r.get("t_bins"), dict)]
    if not rows:
        return {"window": 0, "first_step": [], "last_step": [], "pairs": [], "credit": [], "misranked": []}
    pairs = np.asarray([r["t_bins"]["pairs"] for r in rows], dtype=np.float64)  # [steps, bins]
    per_step = pairs.sum(axis=1).mean() / pairs.shape[1]  # pairs in an average cell of one step
    window = max(1, int(np.ceil(min_pairs / per_step))) if per_step > 0 else len(rows)
    out = {"window": window, "first_step": [], "last_step": [], "pairs": [], "credit": [], "misranked": []}
    for a in range(0, len(rows), window):
        chunk, n = rows[a:a + window], pairs[a:a + window]
        out["first_step"].append(chunk[0]["step"])
        out["last_step"].append(chunk[-1]["step"])
        out["pairs"].append(n.sum(axis=0).astype(int).tolist())
        for key in ("credit", "misranked"):
            values = np.asarray([[np.nan if v is None else v for v in r["t_bins"][key]] for r in chunk])
            weight = np.where(np.isnan(values), 0.0, n)
            total = weight.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(total > 0, np.nansum(values * weight, axis=0) / total, np.nan)
            out[key].append([None if np.isnan(m) else float(m) for m in mean])
    return out


def plot_t_bins(steps: list[dict], path: Path, min_pairs: int = MIN_PAIRS_PER_CELL) -> Path:
    """Where the credit goes over training (docs/method.md 7.4): heat maps, window of steps x bin
    of t, of the mean credit and of the fraction of pairs ranked the wrong way (Delta > 0), pooled
    by t_bin_windows so that every cell holds pairs; an empty cell is blank."""
    fig, (ax_credit, ax_mis) = plt.subplots(1, 2, figsize=(10, 3.5))
    pooled = t_bin_windows(steps, min_pairs)
    if pooled["window"]:
        def grid(key: str) -> np.ndarray:
            return np.asarray([[np.nan if v is None else v for v in row] for row in pooled[key]],
                              dtype=np.float64).T
        extent = (pooled["first_step"][0] - 0.5, pooled["last_step"][-1] + 0.5, 0, 1000)
        label = f"optimizer step (windows of {pooled['window']})"
        for ax, key, title in ((ax_credit, "credit", "mean credit k_t sigmoid(-z)"),
                               (ax_mis, "misranked", "fraction misranked (Delta > 0)")):
            image = ax.imshow(grid(key), aspect="auto", origin="lower", extent=extent, interpolation="nearest",
                              cmap="viridis")
            fig.colorbar(image, ax=ax)
            ax.set(xlabel=label, ylabel="t (10 bins)", title=title)
    else:
        ax_credit.set_title("no t_bins in the step records (older run)")
    return _save(fig, path)


def plot_eval(evals: list[dict], path: Path) -> Path:
    """Held-out implicit accuracy and loss over steps: one line per t bin, overall in black."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    if evals:
        x = [r["step"] for r in evals]
        for j, t in enumerate(evals[-1]["t_bins"]):
            ax_acc.plot(x, [r["implicit_acc_by_t"][j] for r in evals], lw=1, alpha=0.7, label=f"t = {t}")
            ax_loss.plot(x, [r["loss_by_t"][j] for r in evals], lw=1, alpha=0.7, label=f"t = {t}")
        ax_acc.plot(x, [r["implicit_acc"] for r in evals], "k-o", lw=2, ms=3, label="all bins")
        ax_loss.plot(x, [r["loss"] for r in evals], "k-o", lw=2, ms=3, label="all bins")
        ax_acc.axhline(0.5, color="grey", ls="--", lw=1)
        ax_acc.legend(fontsize=7, loc="lower right")
        ax_acc.set_title(f"held-out implicit accuracy ({evals[-1]['pairs']} pairs)")
        ax_loss.set_title(f"held-out loss ({evals[-1]['method']})")
    else:
        ax_acc.set_title("no held-out evaluation (data.eval_index)")
        ax_loss.set_title("no held-out evaluation")
    ax_acc.set(xlabel="optimizer step", ylabel="fraction of pairs with Delta < 0", ylim=(-0.05, 1.05))
    ax_loss.set(xlabel="optimizer step", ylabel="loss")
    return _save(fig, path)


def eval_summary(evals: list[dict]) -> str:
    """One line: held-out implicit accuracy before (first evaluation) and after (last)."""
    if not evals:
        return "no held-out evaluation in this run (set data.eval_index)"
    first, last = evals[0], evals[-1]
    line = (f"held-out implicit accuracy ({last['pairs']} pairs x {len(last['t_bins'])} t bins, fraction with "
            f"Delta < 0; chance 0.5): step {first['step']} {first['implicit_acc']:.3f}")
    if first["step"] == 0 and first["delta"] == 0.0:
        line += " (policy = reference, Delta = 0)"
    if len(evals) > 2:
        line += f", step {evals[1]['step']} {evals[1]['implicit_acc']:.3f}"
    by_t = ", ".join(f"t={t} {a:.2f}" for t, a in zip(last["t_bins"], last["implicit_acc_by_t"]))
    return line + f" -> step {last['step']} {last['implicit_acc']:.3f} ({by_t})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/figures")
    parser.add_argument("--bins", type=int, default=20)
    args = parser.parse_args(argv)

    def body() -> int:
        for path in plot_run(args.run_dir, args.out or args.run_dir / "figures", args.bins):
            print(path)
        return 0

    return run_main(TOOL, body)


if __name__ == "__main__":
    raise SystemExit(main())
