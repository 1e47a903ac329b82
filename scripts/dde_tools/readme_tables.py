"""Rewrite the README's quick-start accuracy table from the runs it describes, so it cannot drift.

    python -m dde_tools.readme_tables --run 0=runs/readme_seed0 --run 1=runs/readme_seed1 \
        [--readme README.md] [--check]

Each ``--run SEED=RUN_DIR`` gives one row: the held-out implicit accuracy (``kind: eval`` records of
RUN_DIR/metrics.jsonl, docs/formats.md section 5) at every evaluated step; the first run is the one
whose figures the README shows. Only the lines between ``<!-- readme_tables:quickstart begin -->``
and ``<!-- readme_tables:quickstart end -->`` are rewritten; every other byte of the README is kept.
``bash scripts/readme_tables.sh`` trains the runs and calls this.

Exit codes: 0 written (or, with ``--check``, the README matches the runs); 1 ``--check`` found a
difference (a diff on stderr; nothing written) or a write failed; 2 bad input (a missing run
folder, a run without eval records, runs scored on different pairs, a README without the markers).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path

from dde_tools.common import ToolError, run_main, write_text_atomic
from dde_tools.plot_run import read_records

TOOL = "readme_tables"
BLOCK = "quickstart"
BEGIN = f"<!-- readme_tables:{BLOCK} begin -->"
END = f"<!-- readme_tables:{BLOCK} end -->"
EXIT_DIFFERS = 1
REGENERATE = "bash scripts/readme_tables.sh"
WIDTH = 100  # README.md's line width


def parse_run(text: str) -> tuple[str, Path]:
    """``SEED=RUN_DIR`` -> (seed, run folder)."""
    seed, sep, run_dir = text.partition("=")
    if not sep or not seed.strip() or not run_dir:
        raise ToolError("--run", "not SEED=RUN_DIR", "e.g. --run 0=runs/readme_seed0", repr(text),
                        "Pass one --run per seed, the seed and its run folder joined by '='.")
    return seed.strip(), Path(run_dir)


def read_evals(run_dir: Path) -> list[dict]:
    """The run's eval records by step (a step evaluated twice keeps its last record)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        found = "no such folder" if not run_dir.exists() else "a folder without metrics.jsonl"
        raise ToolError(run_dir, "not a dde_train run folder", "a run.output_dir holding metrics.jsonl", found,
                        f"Train it first ({REGENERATE}) or fix the --run path.")
    records = read_records(run_dir)
    if not records["eval"]:
        raise ToolError(metrics, "no held-out evaluation", "records of kind 'eval'",
                        f"0 of {sum(len(r) for r in records.values())} records",
                        "Train with data.eval_index set (configs/tiny_dde.yaml sets it), or pass another run.")
    by_step = {record["step"]: record for record in records["eval"]}
    return [by_step[step] for step in sorted(by_step)]


def check_same_draws(runs: dict[str, list[dict]], dirs: dict[str, Path]) -> tuple[int, int]:
    """(pairs, t bins) shared by every run's last evaluation: one table compares like with like."""
    first_seed = next(iter(runs))
    expected = (runs[first_seed][-1]["pairs"], runs[first_seed][-1]["t_bins"])
    for seed, evals in runs.items():
        found = (evals[-1]["pairs"], evals[-1]["t_bins"])
        if found != expected:
            raise ToolError(dirs[seed] / "metrics.jsonl", "evaluated on other held-out draws than the first run",
                            f"{expected[0]} pairs at t {expected[1]} (as {dirs[first_seed]})",
                            f"{found[0]} pairs at t {found[1]}",
                            "Train every run from the same config; only run.seed may differ.")
    return expected[0], len(expected[1])


def accuracy_table(runs: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: one per seed (the first is the figures' run), one column per evaluated step."""
    steps = sorted({record["step"] for evals in runs.values() for record in evals})
    lines = ["| run.seed | " + " | ".join(f"step {step}" for step in steps) + " |",
             "| --- |" + " --- |" * len(steps)]
    for index, (seed, evals) in enumerate(runs.items()):
        acc = {record["step"]: f"{record['implicit_acc']:.3f}" for record in evals}
        label = f"{seed} (the figures)" if index == 0 else seed
        lines.append(f"| {label} | " + " | ".join(acc.get(step, "-") for step in steps) + " |")
    return lines


def render_quickstart(runs: dict[str, list[dict]], dirs: dict[str, Path]) -> str:
    """The README block: caption, table, and the figures' run by t bin at its last evaluation."""
    pairs, bins = check_same_draws(runs, dirs)
    caption = (f"Held-out implicit accuracy ({pairs} pairs x {bins} t bins, fraction with Delta < 0), the quick "
               "start's config with `--set run.seed=S` (the evaluation noise is fixed by `eval.seed`, so all runs "
               "are scored on the same draws):")
    seed, evals = next(iter(runs.items()))
    last = evals[-1]
    by_t = ", ".join(f"t={t} {acc:.3f}" for t, acc in zip(last["t_bins"], last["implicit_acc_by_t"]))
    per_t = f"By t bin at step {last['step']} (run.seed {seed}): {by_t}."
    return "\n".join([wrap(caption), "", *accuracy_table(runs), "", wrap(per_t)]) + "\n"


def wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=WIDTH, break_long_words=False, break_on_hyphens=False)


def split_block(text: str, readme: Path) -> tuple[str, str, str]:
    """(text up to and with the begin marker's line, the block, text from the end marker's line on)."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != 1 or ends != 1:
        raise _marker_error(readme, f"{begins} begin and {ends} end markers")
    begin, tail_start = text.index(BEGIN), text.index(END)
    head_end = text.find("\n", begin) + 1
    if not begin < head_end <= tail_start or not text[:tail_start].endswith("\n"):
        raise _marker_error(readme, "markers out of order or not on lines of their own")
    return text[:head_end], text[head_end:tail_start], text[tail_start:]


def _marker_error(readme: Path, found: str) -> ToolError:
    return ToolError(readme, f"no single {BLOCK} block", f"a line {BEGIN} and, below it, a line {END}", found,
                     "Put the two marker lines around the table (as README.md does), then rerun.")


def read_readme(readme: Path) -> str:
    if not readme.is_file():
        raise ToolError(readme, "README not found", "a markdown file with the readme_tables markers",
                        "no such file", "Pass --readme PATH (default README.md, from the repository root).")
    try:
        return readme.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ToolError(readme, "not UTF-8 text", "a markdown file", str(err)[:120], "Pass the project's README.md.") from err


def block_diff(readme: Path, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"{readme} ({BLOCK} block)", "from the runs"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="SEED=RUN_DIR",
                        help="one table row; repeat per seed (the first is the figures' run)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README differs")
    args = parser.parse_args(argv)

    def body() -> int:
        dirs: dict[str, Path] = {}
        for seed, run_dir in map(parse_run, args.run):
            if seed in dirs:
                raise ToolError("--run", f"seed {seed} given twice", "one --run per seed",
                                f"{dirs[seed]} and {run_dir}", "Drop one of them.")
            dirs[seed] = run_dir
        text = read_readme(args.readme)
        head, old, tail = split_block(text, args.readme)
        new = render_quickstart({seed: read_evals(run_dir) for seed, run_dir in dirs.items()}, dirs)
        if old == new:
            print(f"{TOOL}: {args.readme}: the {BLOCK} block matches the runs")
            return 0
        if args.check:
            print(f"{TOOL}: {args.readme}: the {BLOCK} block differs from the runs "
                  f"({', '.join(map(str, dirs.values()))}); regenerate it with {REGENERATE}:\n"
                  f"{block_diff(args.readme, old, new)}", file=sys.stderr, end="")
            return EXIT_DIFFERS
        write_text_atomic(args.readme, head + new + tail)
        print(f"{TOOL}: {args.readme}: {BLOCK} block rewritten from {len(dirs)} runs")
        return 0

    return run_main(TOOL, body)


if __name__ == "__main__":
    raise SystemExit(main())
