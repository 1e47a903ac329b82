"""Session fixtures: the tiny pipelines, their exports and a 2000-row synthetic Pick-a-Pic, built once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dde_tools import fixtures

# One thread: the models are tiny, and two OpenMP threads on a busy 2-core machine can be 100x slower.
torch.set_num_threads(1)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m dde_tools.<module> args` as a user would."""
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", f"dde_tools.{module}", *args], env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="session")
def run_cli():
    """The run_module function, for tests that drive a CLI."""
    return run_module


@dataclass
class Export:
    pipeline: Path
    out: Path
    manifest: dict
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    fixtures.build_all(out, seed=0)
    return out


@pytest.fixture(scope="session")
def exports(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Export]:
    """Both families exported through the CLI."""
    result = {}
    for family in ("sd15", "sdxl"):
        out = tmp_path_factory.mktemp(f"export_{family}")
        proc = run_module("export_models", "--pipeline", str(fixture_dir / family), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        result[family] = Export(fixture_dir / family, out, manifest, proc.stdout, proc.stderr)
    return result


@pytest.fixture(scope="session")
def bad_parquet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """2000 rows with ~10% ties and 10 planted bad rows of each rejection kind."""
    path = tmp_path_factory.mktemp("pickapic") / "train-bad.parquet"
    planted = fixtures.make_pickapic_parquet(path, rows=2000, seed=0, bad_rows=True)
    return path, planted


@pytest.fixture(scope="session")
def hostile_parquet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """400 rows: 40 ties, 2 planted rows of each kind in REJECTION_KINDS and hostile_rows.KINDS."""
    path = tmp_path_factory.mktemp("pickapic") / "train-hostile.parquet"
    planted = fixtures.make_pickapic_parquet(path, rows=400, seed=0, bad_rows=True, hostile_rows=True)
    return path, planted


@pytest.fixture(scope="session")
def tiny_annotators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight PickScore, HPS and CLIP in the real file formats (annotator_fixtures)."""
    from dde_tools import annotator_fixtures

    return annotator_fixtures.build(tmp_path_factory.mktemp("annotators"), seed=0)


@pytest.fixture(scope="session")
def annotator_flags(tiny_annotators: dict[str, Path]) -> dict[str, list[str]]:
    """The command-line flags naming each tiny annotator ('clip_bin': CLIP from the .bin file)."""
    from dde_tools.annotator_fixtures import TINY_ARCH

    register = ["--open-clip-config", str(tiny_annotators["open_clip_config"])]
    return {
        "pickscore": ["--pickscore-model", str(tiny_annotators["pickscore_model"]),
                      "--pickscore-processor", str(tiny_annotators["pickscore_processor"])],
        "hps": ["--hps-checkpoint", str(tiny_annotators["hps"]), "--hps-arch", TINY_ARCH, *register],
        "clip": ["--clip-weights", str(tiny_annotators["clip"]), "--clip-arch", TINY_ARCH, *register],
        "clip_bin": ["--clip-weights", str(tiny_annotators["clip_bin"]), "--clip-arch", TINY_ARCH, *register],
    }
