"""Turn a dde_train run directory into PNG figures.

    python -m dde_tools.plot_run RUN_DIR [--out RUN_DIR/figures]

Figures:
- ``training.png``: loss and implicit accuracy over optimizer steps;
- ``correction.png``: the correction array E over t (newest checkpoint's correction_ema.json);
- ``credit.png``: the credit weight k_t * sigmoid(-z) binned by t (docs/method.md §5),
  from the per-pair records (config ``logging.per_sample: true``);
- ``eval.png``: held-out implicit accuracy (fraction of pairs with Delta < 0) and the method's loss
  over steps, per t bin and overall, from the ``kind: eval`` records (config ``data.eval_index``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_records(run_dir: Path) -> dict[str, list[dict]]:
    """The records of ``metrics.jsonl`` by kind ("step", "pair", "eval")."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_run: {path} not found: is {run_dir} a dde_train run directory?")
    by_kind: dict[str, list[dict]] = {"step": [], "pair": [], "eval": []}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
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
    return json.loads((complete[-1] / "correction_ema.json").read_text())


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out_dir: Path, bins: int = 20) -> list[Path]:
    steps, pairs = read_metrics(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [r["step"] for r in steps]
    ax_loss.plot(x, [r["loss"] for r in steps])
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    acc = [r.get("implicit_acc") for r in steps]
    if any(a is not None for a in acc):
        ax_acc.plot(x, [np.nan if a is None else a for a in acc])
    ax_acc.set(xlabel="optimizer step", ylabel="implicit accuracy", title="implicit accuracy", ylim=(-0.05, 1.05))
    written.append(_save(fig, out_dir / "training.png"))

    correction = latest_correction(run_dir)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if correction is not None:
        E = np.asarray(correction["E"], dtype=np.float64)
        ax.plot(np.arange(E.size), E)
        ax.set_title(f"correction E over t (step {correction['step']})")
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
    written.append(plot_eval(read_records(run_dir)["eval"], out_dir / "eval.png"))
    return written


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
    for path in plot_run(args.run_dir, args.out or args.run_dir / "figures", args.bins):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
