"""Shared helpers of the end-to-end tests: they drive the real dde_train binary on the tiny
fixtures made by scripts/prepare_tiny.sh (scripts/test.sh runs it first)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_dir() -> Path:
    return Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build"))


def fixtures_dir() -> Path:
    return Path(os.environ.get("DDE_FIXTURES_DIR", ROOT / "fixtures"))


@pytest.fixture(scope="session")
def dde_train() -> Path:
    binary = build_dir() / "dde_train"
    if not binary.is_file():
        pytest.fail(f"{binary} not built: run scripts/build.sh (or set DDE_BUILD_DIR)")
    return binary


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixtures_dir()
    for family in ("sd15", "sdxl"):
        for need in (root / "export" / family / "manifest.json", root / "shards" / family / "index.json",
                     root / "shards" / f"{family}_eval" / "index.json"):
            if not need.is_file():
                pytest.fail(f"{need} missing: run scripts/prepare_tiny.sh (or set DDE_FIXTURES_DIR)")
    return root


def tiny_overrides(fixtures: Path, family: str, out: Path, held_out: bool = False) -> list[str]:
    """--set values pointing a tiny config at the fixtures and a test's own run directory; the
    held-out evaluation only with held_out (it is off otherwise, to keep the other tests fast)."""
    eval_index = fixtures / "shards" / f"{family}_eval" / "index.json" if held_out else ""
    return [
        f"model.manifest={fixtures / 'export' / family / 'manifest.json'}",
        f"data.index={fixtures / 'shards' / family / 'index.json'}",
        f"data.eval_index={eval_index}",
        f"run.output_dir={out}",
    ]


def train_command(binary: Path, config: str, sets: list[str], *, resume: bool = False,
                  flags: list[str] | None = None) -> list[str]:
    cmd = [str(binary), "--config", str(ROOT / "configs" / config)]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    return cmd + (flags or [])


def run_train(binary: Path, config: str, sets: list[str], *, resume: bool = False, env: dict | None = None,
              timeout: float = 600, flags: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = train_command(binary, config, sets, resume=resume, flags=flags)
    full_env = dict(os.environ)
    full_env.update(env or {})
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    skip_on_forced_capability_bug(r)
    return r


# PyTorch's bf16 CPU attention packs with VNNI when the processor has AVX-512 even under a forced
# lower ATEN_CPU_CAPABILITY, then refuses: an inconsistency of PyTorch's, not of this project.
FORCED_CAPABILITY_BUG = "pack_vnni2 is only supported when avx512 is supported"


def skip_on_forced_capability_bug(r: subprocess.CompletedProcess) -> None:
    """Skips (saying why) a test whose run hit FORCED_CAPABILITY_BUG under a forced
    ATEN_CPU_CAPABILITY; anything else is left to the test's own assertions."""
    if r.returncode != 0 and os.environ.get("ATEN_CPU_CAPABILITY") and FORCED_CAPABILITY_BUG in r.stderr:
        pytest.skip(f"PyTorch's bf16 CPU attention under ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} "
                    f"on an AVX-512 processor: '{FORCED_CAPABILITY_BUG}' (a PyTorch inconsistency; the fp32 "
                    "comparisons still run)")


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype set to `dtype` inside: a float64 recomputation needs it, because some
    library code builds constants with the default dtype (transformers' CLIP causal mask fills a
    default-dtype tensor with finfo(float64).min). Noise drawn inside must name its dtype."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def other_kernels_env() -> dict:
    """An environment whose LibTorch runs another CPU kernel set than this process's: the scalar
    'default' set, or 'avx2' when this one is the scalar set. Each set sums in its own order, so
    the same run under it measures the float32 rounding noise of that run on this processor."""
    import torch

    current = torch.backends.cpu.get_cpu_capability()
    return {"ATEN_CPU_CAPABILITY": "avx2" if current == "DEFAULT" else "default"}


def refresh_index(export: Path) -> None:
    """Rewrites bytes and sha256 of every shard after an edit (what the exporter writes)."""
    index = json.loads((export / "index.json").read_text())
    for shard in index["shards"]:
        data = (export / shard["file"]).read_bytes()
        shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (export / "index.json").write_text(json.dumps(index))


def rewrite_members(export: Path, shard: str, edit: Callable[[str, bytes], bytes]) -> None:
    """Rewrites one shard with edit(name, data) applied to every member, as plain ustar."""
    path = export / shard
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = edit(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refresh_index(export)


def rewrite_shards(index_path: Path, out: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of the export of `index_path` in `out` whose tar members are `change(name, data)`,
    with the sizes and hashes of index.json updated (a valid export). Returns the new index.json."""
    shutil.copytree(index_path.parent, out)
    for shard in json.loads(index_path.read_text())["shards"]:
        rewrite_members(out, shard["file"], change)
    return out / "index.json"


def read_records(run_dir: Path, kind: str, live: bool = False) -> list[dict]:
    """The records of one kind ("step", "pair", "eval") of metrics.jsonl, in file order. `live`: the
    run is still writing, so a last line without its newline is a record half written (a long
    record can reach the file in two writes) and is left for the next read; otherwise every line
    must parse."""
    text = (run_dir / "metrics.jsonl").read_text()
    if live:
        text = text[: text.rfind("\n") + 1]
    records = (json.loads(line) for line in text.splitlines())
    return [rec for rec in records if rec.get("kind") == kind]


def read_metrics(run_dir: Path, live: bool = False) -> tuple[list[dict], list[dict]]:
    """Step records and per-pair records (`live`: see read_records)."""
    return read_records(run_dir, "step", live), read_records(run_dir, "pair", live)
