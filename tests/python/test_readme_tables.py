"""readme_tables: the README's quick-start table rendered from run folders (issue 17).

Synthetic metrics.jsonl files written here; no dde_train run. The tool runs in-process (main),
so the whole file takes well under a second after the session's imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dde_tools import readme_tables
from dde_tools.readme_tables import BEGIN, END

T_BINS = [100, 300, 500, 700, 900]
# Outside the block: CRLF line ends, non-ASCII text and no final newline must survive byte for byte.
HEAD = "# Title\r\n\nIntro – with “quotes”.\n\n"
TAIL = "\nAfter the table.\r\n\n## Tests\n\nno final newline"


def eval_record(step: int, acc: float, pairs: int = 43) -> dict:
    return {"kind": "eval", "step": step, "method": "dde", "pairs": pairs, "t_bins": T_BINS,
            "implicit_acc": acc, "loss": 0.69, "delta": 0.0, "implicit_acc_by_t": [acc] * len(T_BINS),
            "loss_by_t": [0.69] * len(T_BINS), "delta_by_t": [0.0] * len(T_BINS), "seconds": 1.0}


def write_run(folder: Path, accs: dict[int, float], pairs: int = 43) -> Path:
    """A run folder whose metrics.jsonl holds one step record and an eval record per step."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"kind": "step", "step": 1, "loss": 0.69}] + [eval_record(s, a, pairs) for s, a in accs.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[str]:
    """--run arguments for seeds 0 and 1 (seed 1 lacks step 40)."""
    write_run(tmp_path / "seed0", {0: 0.0, 40: 0.5581, 400: 0.86})
    write_run(tmp_path / "seed1", {0: 0.0, 400: 0.8139})
    return ["--run", f"0={tmp_path / 'seed0'}", "--run", f"1={tmp_path / 'seed1'}"]


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_bytes(f"{HEAD}{BEGIN}\nold table\n{END}{TAIL}".encode("utf-8"))
    return path


def tool(*argv: str | Path) -> int:
    return readme_tables.main([str(a) for a in argv])


def test_renders_one_row_per_seed_and_a_column_per_step(runs: list[str], readme: Path) -> None:
    assert tool(*runs, "--readme", readme) == 0
    text = readme.read_bytes().decode("utf-8")
    assert "| run.seed | step 0 | step 40 | step 400 |\n| --- | --- | --- | --- |\n" \
           "| 0 (the figures) | 0.000 | 0.558 | 0.860 |\n| 1 | 0.000 | - | 0.814 |\n" in text
    assert "(43 pairs x 5 t bins," in text
    assert "By t bin at step 400 (run.seed 0): t=100 0.860, t=300 0.860," in text


def test_rewrite_keeps_every_byte_outside_the_block(runs: list[str], readme: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(*runs, "--readme", readme) == 0
    data = readme.read_bytes()
    assert data.startswith(f"{HEAD}{BEGIN}\n".encode("utf-8"))
    assert data.endswith(f"\n{END}{TAIL}".encode("utf-8"))
    assert b"old table" not in data
    assert tool(*runs, "--readme", readme) == 0  # a second run finds nothing to change
    assert readme.read_bytes() == data
    assert "matches the runs" in capsys.readouterr().out


def test_check_reports_a_changed_number_and_writes_nothing(tmp_path: Path, runs: list[str], readme: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(*runs, "--readme", readme) == 0
    assert tool(*runs, "--readme", readme, "--check") == 0
    written = readme.read_bytes()
    write_run(tmp_path / "seed1", {0: 0.0, 400: 0.7907})
    capsys.readouterr()
    assert tool(*runs, "--readme", readme, "--check") == 1
    err = capsys.readouterr().err
    assert "differs from the runs" in err and "bash scripts/readme_tables.sh" in err
    assert "-| 1 | 0.000 | - | 0.814 |" in err and "+| 1 | 0.000 | - | 0.791 |" in err
    assert readme.read_bytes() == written


def test_check_on_the_placeholder_block_fails(runs: list[str], readme: Path) -> None:
    assert tool(*runs, "--readme", readme, "--check") == 1


@pytest.mark.parametrize("case", ["missing run", "folder without metrics", "no eval records", "other pairs",
                                  "no markers", "two begin markers", "markers reversed", "reversed on one line", "end marker mid-line", "missing README",
                                  "run without '='", "seed twice"])
def test_bad_input_exits_2_naming_the_path(case: str, tmp_path: Path, runs: list[str], readme: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    named = str(readme)
    if case == "missing run":
        runs, named = runs + ["--run", f"2={tmp_path / 'absent'}"], str(tmp_path / "absent")
    elif case == "folder without metrics":
        (tmp_path / "empty").mkdir()
        runs, named = runs + ["--run", f"2={tmp_path / 'empty'}"], str(tmp_path / "empty")
    elif case == "no eval records":
        write_run(tmp_path / "noeval", {})
        runs, named = runs + ["--run", f"2={tmp_path / 'noeval'}"], str(tmp_path / "noeval" / "metrics.jsonl")
    elif case == "other pairs":
        write_run(tmp_path / "seed1", {0: 0.0, 400: 0.8}, pairs=40)
        named = str(tmp_path / "seed1" / "metrics.jsonl")
    elif case == "no markers":
        readme.write_text("# Title\n\nno markers\n", encoding="utf-8")
    elif case == "two begin markers":
        readme.write_text(f"{BEGIN}\n{BEGIN}\nx\n{END}\n", encoding="utf-8")
    elif case == "markers reversed":
        readme.write_text(f"# Title\n{END}\nx\n{BEGIN}\n", encoding="utf-8")
    elif case == "reversed on one line":
        readme.write_text(f"# Title\n{END}{BEGIN}", encoding="utf-8")
    elif case == "end marker mid-line":
        readme.write_text(f"{BEGIN}\nx {END}\n", encoding="utf-8")
    elif case == "missing README":
        readme.unlink()
    elif case == "run without '='":
        runs, named = ["--run", str(tmp_path / "seed0")], "--run"
    elif case == "seed twice":
        runs, named = runs + ["--run", f"1={tmp_path / 'seed0'}"], "seed 1 given twice"
    before = readme.read_bytes() if readme.exists() else None
    assert tool(*runs, "--readme", readme) == 2
    err = capsys.readouterr().err
    assert err.startswith("readme_tables: error: ") and err.count("\n") == 1, err
    assert named in err and "expected" in err and "found" in err, err
    assert (readme.read_bytes() if readme.exists() else None) == before


def test_runs_as_a_module(run_cli, runs: list[str], readme: Path) -> None:
    proc = run_cli("readme_tables", *runs, "--readme", str(readme), "--check")
    assert proc.returncode == 1 and "differs from the runs" in proc.stderr, proc.stderr
