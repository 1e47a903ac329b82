"""dde_train and dde_encode_cache on the strict fake accelerator (tests/fake_device/fake_device.cpp,
LD_PRELOADed, run.device: privateuseone): every method and both families train with the held-out
evaluation, a bad pair mid-run, resume, the latent cache, two Gloo ranks and ZeRO-1. Any host tensor
on the step's path (a traced host constant, a host buffer handed to a collective, a host tensor
mixed into the per-pair errors) fails here as it would on CUDA.

Run by scripts/fake_device_check.sh (which scripts/test.sh calls)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import build_dir, fixtures_dir, read_records, rewrite_shards, tiny_overrides  # noqa: E402

METHODS = ["uniform", "discounted", "dde", "dde_single", "dde_step", "sft", "uniform_ct"]
FAMILIES = {"sd15": "tiny_dde.yaml", "sdxl": "tiny_sdxl_dde.yaml"}
DEVICE_ERROR = "Expected all tensors to be on the same device"


def fake_library() -> Path:
    lib = build_dir() / "tests" / "cpp" / "libdde_fake_device.so"
    if not lib.is_file():
        pytest.fail(f"{lib} not built: run scripts/build.sh")
    return lib


def fake_env(**extra: str) -> dict:
    return dict(os.environ, LD_PRELOAD=str(fake_library()), OMP_NUM_THREADS="1", **extra)


def check(r: subprocess.CompletedProcess, what: str) -> None:
    out = r.stdout + r.stderr
    assert DEVICE_ERROR not in out and "wrong device" not in out, f"{what}: a device error\n{out[-4000:]}"
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{out[-4000:]}"


def with_a_bad_pair(family: str, tmp_path: Path) -> Path:
    """The family's shards with pair 5 of every shard's winner replaced by a GIF (skipped and
    counted as a bad pair). With shuffle_buffer 1, step 2 of 2 pairs a step meets it."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")

    def plant(name: str, data: bytes) -> bytes:
        key, member = name.split(".", 1)
        return gif.getvalue() if int(key) % 16 == 2 and member == "0.jpg" else data

    return rewrite_shards(fixtures_dir() / "shards" / family / "index.json", tmp_path / "shards", plant).parent


def train_args(family: str, method: str, out: Path, *sets: str) -> list[str]:
    args = [str(build_dir() / "dde_train"), "--config", str(ROOT / "configs" / FAMILIES[family])]
    for s in tiny_overrides(fixtures_dir(), family, out, held_out=True) + [
        "run.device=privateuseone",
        f"method.name={method}",
        "train.global_batch=2",
        "train.micro_batch=1",  # two micro-batches: accumulation on the device
        "optim.warmup_steps=0",
        "data.shuffle_buffer=1",
        "data.workers=1",
        "eval.every=2",
        "eval.t_bins=[100,900]",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        "logging.per_sample=true",
        *sets,
    ]:
        args += ["--set", s]
    return args


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=fake_env(**env))


def on_the_cpu(args: list[str], out: Path, new_out: Path) -> list[str]:
    """The same command with run.device=cpu (later --set wins) writing to `new_out`."""
    swapped = [a.replace(f"run.output_dir={out}", f"run.output_dir={new_out}") for a in args]
    return swapped + ["--set", "run.device=cpu"]


# Figures that depend on time or memory, not on the computation.
NOT_NUMBERS = {"pairs_per_s", "data_wait_frac", "mem_held_mb", "mem_peak_mb", "mem_forward_peak_mb", "seconds"}


def assert_same_numbers(device_run: Path, cpu_run: Path, step: int) -> None:
    """The fake device runs the CPU's kernels on the same memory, and every draw comes from
    per-pair CPU generators: its records and weights must equal a CPU run's bit for bit. A
    device-only numeric bug (a transfer that rounds, a device-side table, ZeRO-1's shards on the
    device) shows here and nowhere else."""
    for kind in ("step", "pair", "eval", "bad_pair"):
        got, want = read_records(device_run, kind), read_records(cpu_run, kind)
        assert len(got) == len(want), kind
        for g, w in zip(got, want):
            keys = set(w) - NOT_NUMBERS
            assert {k: g.get(k) for k in keys} == {k: w[k] for k in keys}, (kind, g, w)
    name = f"checkpoints/step-{step:08d}/unet/diffusion_pytorch_model.safetensors"
    got, want = load_file(str(device_run / name)), load_file(str(cpu_run / name))
    assert got.keys() == want.keys()
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"weights differ from the CPU run's: {differ[:5]}"


@pytest.fixture(scope="module", params=list(FAMILIES))
def bad_shards(request, tmp_path_factory):
    return request.param, with_a_bad_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("method", METHODS)
def test_train_evaluate_skip_a_bad_pair_and_resume(bad_shards, method, tmp_path):
    family, shards = bad_shards
    out = tmp_path / "run"
    data = f"data.index={shards / 'index.json'}"
    args = train_args(family, method, out, data, "train.max_steps=2")
    check(run(args), f"{family} {method}")
    check(run(on_the_cpu(args, out, tmp_path / "cpu")), f"{family} {method} on the CPU")
    assert_same_numbers(out, tmp_path / "cpu", step=2)
    steps = read_records(out, "step")
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[-1]["bad_pairs"] == 1, "the bad pair of step 2 was not skipped and counted"
    assert len(read_records(out, "bad_pair")) == 1
    assert [e["step"] for e in read_records(out, "eval")] == [0, 2]
    resumed = run(train_args(family, method, out, data, "train.max_steps=3") + ["--resume"])
    check(resumed, f"{family} {method} --resume")
    assert [s["step"] for s in read_records(out, "step")] == [1, 2, 3]
    assert all(s["loss"] == s["loss"] for s in read_records(out, "step"))  # not NaN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_latent_cache_is_encoded_and_trained_from_on_the_device(family, tmp_path):
    cache = tmp_path / "cache"
    sets = tiny_overrides(fixtures_dir(), family, tmp_path / "unused") + ["run.device=privateuseone"]
    cmd = [str(build_dir() / "dde_encode_cache"), "--config", str(ROOT / "configs" / FAMILIES[family]),
           "--out", str(cache), "--batch", "3"]
    for s in sets:
        cmd += ["--set", s]
    check(run(cmd), f"{family} dde_encode_cache")
    # The cache the device encodes is the CPU's, byte for byte.
    cpu_cache = tmp_path / "cpu_cache"
    cpu_cmd = [a.replace(str(cache), str(cpu_cache)) for a in cmd] + ["--set", "run.device=cpu"]
    check(run(cpu_cmd), f"{family} dde_encode_cache on the CPU")
    for path in sorted(cache.glob("*.safetensors")):
        assert path.read_bytes() == (cpu_cache / path.name).read_bytes(), path.name
    for method in ("dde", "uniform"):
        out = tmp_path / method
        args = train_args(family, method, out, f"data.cache={cache / 'index.json'}", "train.max_steps=2")
        check(run(args), f"{family} {method} from the cache")
        check(run(on_the_cpu(args, out, tmp_path / f"{method}_cpu")), f"{family} {method} from the cache, CPU")
        assert_same_numbers(out, tmp_path / f"{method}_cpu", step=2)
        assert len(read_records(out, "step")) == 2


def run_ranks(args: list[str], port: int, what: str) -> None:
    procs = []
    for rank in range(2):
        env = fake_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for rank, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=300)
        check(subprocess.CompletedProcess(args, p.returncode, stdout, stderr), f"{what} rank {rank}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("zero1", [False, True], ids=["allreduce", "zero1"])
def test_two_gloo_ranks_stage_through_the_host(family, zero1, tmp_path):
    shards = with_a_bad_pair(family, tmp_path)
    out = tmp_path / "run"
    port = free_port()
    args = train_args(family, "dde", out, f"data.index={shards / 'index.json'}", "train.max_steps=2",
                      "train.global_batch=4", "dist.backend=gloo", f"dist.shard_optimizer={str(zero1).lower()}")
    run_ranks(args, port, f"{family}")
    run_ranks(on_the_cpu(args, out, tmp_path / "cpu"), free_port(), f"{family} on the CPU")
    assert_same_numbers(out, tmp_path / "cpu", step=2)
    steps = read_records(out, "step")
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[-1]["bad_pairs"] >= 1
    assert [e["step"] for e in read_records(out, "eval")] == [0, 2]
