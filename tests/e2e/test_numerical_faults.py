"""Checkpoints that are only ever good (the real dde_train on the tiny fixtures): a diverging run keeps
its last good checkpoint and never writes a bad one; a checkpoint with a NaN optimizer moment is
refused at resume, naming the file and tensor; NaN in an exported model or in a latent cache is
pinned to its source; a file-size limit during a checkpoint write is named and leaves the previous
checkpoint intact."""

from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from conftest import ROOT, build_dir, read_records, run_train, tiny_overrides


def complete_steps(run: Path) -> list[int]:
    return sorted(int(m.parent.name.split("-")[1]) for m in (run / "checkpoints").glob("step-*/COMPLETE"))


def unet_weights(run: Path, step: int) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_diverging_run_keeps_its_last_good_checkpoint(dde_train, fixtures, tmp_path):
    # lr 1e30 with a 4-step warm-up: step 1 has lr 0 (passes, checkpointed); from step 2 every
    # update blows the weights up by ~1e29, is rejected and rolled back to step 1.
    out = tmp_path / "diverge"
    sets = tiny_overrides(fixtures, "sd15", out) + [
        "optim.lr=1e30", "optim.warmup_steps=4", "train.max_steps=10", "checkpoint.every=1",
        "checkpoint.keep=2", "optim.max_nonfinite_in_row=3", "logging.per_sample=false"]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 1, r.stderr[-3000:]
    message = r.stderr[r.stderr.rfind("too many non-finite steps in a row"):]
    assert "weights after the update" in message, message
    assert "step-00000001" in message, message
    assert "rolled back" in r.stderr
    # Every checkpoint on disk passed the check: only step 1's, finite and of the initial size.
    assert complete_steps(out) == [1]
    weights = unet_weights(out, 1)
    assert all(np.isfinite(w).all() for w in weights.values())
    assert max(float(np.abs(w).max()) for w in weights.values()) < 1e3
    steps = read_records(out, "step")
    assert [s["skipped_steps"] for s in steps] == [0, 1, 2, 3]


def test_a_nan_optimizer_moment_is_refused_at_resume(dde_train, fixtures, tmp_path):
    out = tmp_path / "nan_moment"
    sets = tiny_overrides(fixtures, "sd15", out) + ["train.max_steps=2", "checkpoint.every=1",
                                                     "optim.warmup_steps=0", "logging.per_sample=false"]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 0, r.stderr[-3000:]
    state_file = out / "checkpoints" / "step-00000002" / "training_state.safetensors"
    state = load_file(str(state_file))
    name = sorted(k for k in state if k.startswith("exp_avg."))[3]
    state[name] = state[name].copy()
    state[name].flat[0] = np.nan
    save_file(state, str(state_file))
    before = state_file.read_bytes()
    r = run_train(dde_train, "tiny_dde.yaml", sets[:-4] + ["train.max_steps=3"], resume=True)
    assert r.returncode == 1
    assert "non-finite values in a checkpoint" in r.stderr, r.stderr[-3000:]
    assert f"{state_file}: {name}" in r.stderr, r.stderr[-3000:]
    assert state_file.read_bytes() == before  # nothing overwritten
    assert complete_steps(out) == [1, 2]


def test_nan_weights_in_an_exported_model_are_named_at_load(dde_train, fixtures, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(fixtures / "export" / "sd15", export)
    manifest = json.loads((export / "manifest.json").read_text())
    block = export / manifest["unet"]["blocks"][1]["file"]
    module = torch.jit.load(str(block))
    name, param = next(iter(module.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    torch.jit.save(module, str(block))
    out = tmp_path / "run"
    sets = tiny_overrides(fixtures, "sd15", out) + [f"model.manifest={export / 'manifest.json'}", "train.max_steps=1"]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 1
    assert "non-finite weights in an exported model" in r.stderr, r.stderr[-3000:]
    assert f"{block}: {name}" in r.stderr, r.stderr[-3000:]


def poison_cache_row(shard: Path, row: int) -> None:
    """Writes NaN over the first value of `moments` row `row`, in place (sizes unchanged)."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    info = header["moments"]
    assert info["dtype"] == "F32"
    per_row = int(np.prod(info["shape"][1:])) * 4
    start = 8 + n + info["data_offsets"][0] + row * per_row
    data[start : start + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(bytes(data))


def test_nan_in_a_latent_cache_is_a_bad_pair_named_by_its_row(fixtures, dde_train, tmp_path):
    cache = tmp_path / "cache"
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused")
    cmd = [str(build_dir() / "dde_encode_cache"), "--config", str(ROOT / "configs" / "tiny_dde.yaml"), "--out", str(cache)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((cache / "index.json").read_text())
    shards = [cache / s["file"] for s in index["shards"]]
    for shard in shards:  # row 1 of whichever shard the run reads first
        poison_cache_row(shard, 1)
    out = tmp_path / "run"
    train_sets = tiny_overrides(fixtures, "sd15", out) + [
        f"data.cache={cache / 'index.json'}", "data.eval_index=", "train.max_steps=2", "data.shuffle_buffer=1",
        "optim.warmup_steps=0", "logging.per_sample=false"]
    r = run_train(dde_train, "tiny_dde.yaml", train_sets)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = read_records(out, "bad_pair")
    assert [b["reason"] for b in bad] == ["cache_non_finite"], bad
    assert "non-finite values in the latent cache" in r.stderr
    assert any(f"{shard}: row 1" in r.stderr for shard in shards), r.stderr[-2000:]
    assert all(s["skipped_steps"] == 0 for s in read_records(out, "step"))


def test_a_file_size_limit_during_a_checkpoint_is_named_and_keeps_the_previous_one(dde_train, fixtures, tmp_path):
    out = tmp_path / "efbig"
    sets = tiny_overrides(fixtures, "sd15", out) + ["train.max_steps=1", "checkpoint.every=1",
                                                     "optim.warmup_steps=0", "logging.per_sample=false"]
    assert run_train(dde_train, "tiny_dde.yaml", sets).returncode == 0
    weights = out / "checkpoints" / "step-00000001" / "unet" / "diffusion_pytorch_model.safetensors"
    limit = weights.stat().st_size // 2  # the next checkpoint's weights cannot be written

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [str(dde_train), "--config", str(ROOT / "configs" / "tiny_dde.yaml"), "--resume"]
    for s in sets[:-4] + ["train.max_steps=2", "checkpoint.every=1", "logging.per_sample=false"]:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=cap)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "file-size limit" in r.stderr and "EFBIG" in r.stderr, r.stderr[-3000:]
    assert complete_steps(out) == [1]
    assert all(np.isfinite(w).all() for w in unet_weights(out, 1).values())


def test_an_unwritable_output_folder_is_found_at_start(dde_train, fixtures, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", blocker / "run") + ["train.max_steps=1"])
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr[-2000:]
    assert str(blocker) in r.stderr


def scale_cache_row(shard: Path, row: int, value: float) -> None:
    """Writes a finite `value` over every latent mean of `moments` row `row`, in place: a real
    input (nothing the loader's finiteness check refuses) whose forward pass overflows float32."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    info = header["moments"]
    shape = info["shape"][1:]  # [2 images, 2 flips, 2 (mean, logvar), C, h, h]
    per_row = int(np.prod(shape)) * 4
    start = 8 + n + info["data_offsets"][0] + row * per_row
    moments = np.frombuffer(bytes(data[start : start + per_row]), dtype="<f4").reshape(shape).copy()
    moments[:, :, 0] = value
    data[start : start + per_row] = moments.tobytes()
    shard.write_bytes(bytes(data))


def untied_rows(source_shard: Path) -> list[int]:
    """Positions (in shard order) of the pairs whose labels differ: the pairs a run trains on."""
    rows, position = [], 0
    with tarfile.open(source_shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                record = json.loads(tar.extractfile(member).read())
                if record["label_0"] != record["label_1"]:
                    rows.append(position)
                position += 1
    return rows


def test_a_real_nonfinite_step_is_skipped_by_the_guard_naming_its_cause(fixtures, dde_train, tmp_path):
    """No test seam: a cache row with finite but huge latents (1e38) overflows the forward pass of
    one step, so its loss and gradient are really non-finite. The guard must skip that step in
    place (no roll-back: there is no checkpoint yet), say why ("non-finite inputs": the frozen
    reference's errors are non-finite too), and leave the policy exactly as a run that stopped
    before the bad step has it: the held-out evaluation after the skipped step equals, figure for
    figure, that run's last one. The next step trains on."""
    cache = tmp_path / "cache"
    sets = tiny_overrides(fixtures, "sd15", tmp_path / "unused")
    cmd = [str(build_dir() / "dde_encode_cache"), "--config", str(ROOT / "configs" / "tiny_dde.yaml"), "--out", str(cache)]
    for s in sets:
        cmd += ["--set", s]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode == 0
    clean = tmp_path / "clean_cache"
    shutil.copytree(cache, clean)
    index = json.loads((cache / "index.json").read_text())
    source = json.loads((fixtures / "shards" / "sd15" / "index.json").read_text())
    # With shuffle_buffer 1 a step reads 4 consecutive trained pairs of the first shard: poison the
    # 9th trained pair of every shard, whichever the seeded order reads first (step 3).
    for entry, src in zip(index["shards"], source["shards"]):
        rows = untied_rows(fixtures / "shards" / "sd15" / src["file"])
        if len(rows) > 8:  # a shorter shard read first ends within steps 1-2: its successor is read
            scale_cache_row(cache / entry["file"], rows[8], 1e38)
    common = tiny_overrides(fixtures, "sd15", tmp_path / "unused", held_out=True)[:-1] + [
        "data.shuffle_buffer=1", "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.every=100",
        "logging.per_sample=false", "train.global_batch=4", "train.micro_batch=4", "eval.every=3",
        "eval.t_bins=[500]"]
    bad = tmp_path / "bad"
    r = run_train(dde_train, "tiny_dde.yaml", common + [f"run.output_dir={bad}", f"data.cache={cache / 'index.json'}",
                                                        "train.max_steps=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    steps = read_records(bad, "step")
    assert [s["skipped_steps"] for s in steps] == [0, 0, 1, 1], steps
    assert "step 3: non-finite inputs" in r.stderr and "update skipped" in r.stderr, r.stderr[-3000:]
    assert "rolled back" not in r.stderr and "weights after the update" not in r.stderr
    assert not read_records(bad, "bad_pair")  # a finite row is no bad pair: the guard is what acts
    assert steps[3]["loss"] == steps[3]["loss"] and steps[3]["grad_norm"] > 0  # step 4 trained
    before = tmp_path / "before"
    r = run_train(dde_train, "tiny_dde.yaml", common + [f"run.output_dir={before}", f"data.cache={clean / 'index.json'}",
                                                        "train.max_steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    after_skip = next(e for e in read_records(bad, "eval") if e["step"] == 3)
    stopped = next(e for e in read_records(before, "eval") if e["step"] == 2)
    figures = lambda e: {k: v for k, v in e.items() if k not in ("step", "seconds")}  # noqa: E731
    assert figures(after_skip) == figures(stopped)
    assert any(d != 0.0 for d in stopped["delta_by_t"])  # two steps moved the policy: the comparison sees it
