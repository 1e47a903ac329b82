"""Bad input and output safety of every dde_tools entry point.

Each tool with a main answers bad input with exit 2 and one line on stderr, no traceback; no tool
writes over (or deletes) what it did not write. export_diffusers runs here on a fake run folder
(checkpoints made of the tiny fixture's UNet: the layout of docs/formats.md §3), so these tests
need no dde_train build; tests/e2e/test_export_diffusers.py does the same on real runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dde_tools import common, export_diffusers

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir' / 'link -> target') of everything under `folder`."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                result[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                result[rel] = "dir"
            else:
                result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def export(*argv: str | Path) -> tuple[int, str, str]:
    """export_diffusers.main in-process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = export_diffusers.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def one_line_error(tool: str, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{tool}: error: "), stderr
    assert len([line for line in lines if "error" in line]) == 1, stderr


def make_checkpoint(step_dir: Path, unet: Path, shift: float, complete: bool = True) -> None:
    (step_dir / "unet").mkdir(parents=True)
    shutil.copyfile(unet / "config.json", step_dir / "unet" / "config.json")
    tensors = {k: v + shift for k, v in load_file(str(unet / WEIGHTS)).items()}
    save_file(tensors, str(step_dir / "unet" / WEIGHTS))
    (step_dir / "trainer_state.json").write_text(json.dumps({"format": "dde-checkpoint", "version": 1}))
    if complete:
        (step_dir / "COMPLETE").write_text(step_dir.name.removeprefix("step-") + "\n")


@pytest.fixture(scope="module")
def run_dir(fixture_dir: Path, tmp_path_factory) -> Path:
    """RUN with metrics.jsonl, train.log, complete steps 1 and 2 and an unfinished step 3."""
    run = tmp_path_factory.mktemp("fake_run") / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 0.69}\n')
    (run / "train.log").write_text("step 1\n")
    unet = fixture_dir / "sd15" / "unet"
    make_checkpoint(run / "checkpoints" / "step-00000001", unet, 0.0)
    make_checkpoint(run / "checkpoints" / "step-00000002", unet, 1e-3)
    make_checkpoint(run / "checkpoints" / "step-00000003", unet, 2e-3, complete=False)
    return run


# ---------------------------------------------------------------------------------------------
# export_diffusers: which checkpoint, what is copied

@pytest.mark.parametrize("given", ["", "checkpoints", "latest", "checkpoints/latest"])
def test_a_run_folder_exports_its_newest_complete_step(run_dir, tmp_path, given) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = export("--checkpoint", run_dir / given if given else run_dir, "--out", out)
    assert code == 0, stderr
    step = run_dir / "checkpoints" / "step-00000002"
    assert f"exporting {step} (the newest complete step of {run_dir})" in stdout
    info = json.loads((out / "dde_export.json").read_text())
    assert (info["step"], info["checkpoint"]) == (2, str(step.resolve()))
    assert torch.equal(load_file(str(out / "unet" / WEIGHTS))["conv_in.weight"],
                       load_file(str(step / "unet" / WEIGHTS))["conv_in.weight"])


def test_a_run_without_a_complete_step_is_named(run_dir, tmp_path) -> None:
    run = tmp_path / "young_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000003")
    code, _, stderr = export("--checkpoint", run, "--out", tmp_path / "out")
    assert code == 2 and "no complete checkpoint" in stderr and "1 step folders, none complete" in stderr
    one_line_error("export_diffusers", stderr)


def test_only_the_pipeline_components_are_copied(fixture_dir, run_dir, tmp_path) -> None:
    """A source pipeline as model hubs ship it: single-file checkpoints at the top, other weight
    formats inside the components. Only model_index.json and its components' loadable files come."""
    from diffusers import StableDiffusionPipeline

    source = tmp_path / "source"
    shutil.copytree(fixture_dir / "sd15", source)
    junk = {"v1-5-pruned.ckpt": 3_000_000, "v1-5-pruned-emaonly.safetensors": 2_000_000, "README.md": 100,
            "extras/big.bin": 1_000_000, "vae/diffusion_pytorch_model.fp16.safetensors": 500_000,
            "vae/diffusion_pytorch_model.bin": 1_000_000, "text_encoder/flax_model.msgpack": 400_000,
            "text_encoder/model.fp16.safetensors": 100_000, "unet/diffusion_pytorch_model.bin": 4_000_000}
    for name, size in junk.items():
        (source / name).parent.mkdir(exist_ok=True)
        (source / name).write_bytes(os.urandom(size))
    out = tmp_path / "out"
    code, stdout, stderr = export("--checkpoint", run_dir, "--pipeline", source, "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([common.MARKER, "dde_export.json", "model_index.json",
                                                            "scheduler", "text_encoder", "tokenizer", "unet", "vae"])
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["config.json", WEIGHTS]
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    for part in ("model_index.json", "tokenizer/vocab.json", "vae/" + WEIGHTS, "scheduler/scheduler_config.json"):
        assert (out / part).read_bytes() == (source / part).read_bytes(), part
    copied = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert copied < 8_000_000 and "MiB of other weight formats left out" in stdout
    pipe = StableDiffusionPipeline.from_pretrained(out)
    saved = load_file(str(run_dir / "checkpoints" / "step-00000002" / "unet" / WEIGHTS))
    assert all(torch.equal(t, saved[name]) for name, t in pipe.unet.state_dict().items())


def test_a_checkpoint_that_does_not_fit_the_pipeline_is_refused(fixture_dir, run_dir, tmp_path) -> None:
    code, _, stderr = export("--checkpoint", run_dir, "--pipeline", fixture_dir / "sdxl", "--out", tmp_path / "o")
    assert code == 2 and "the checkpoint's UNet does not fit this pipeline" in stderr
    one_line_error("export_diffusers", stderr)
    assert not (tmp_path / "o").exists()


def test_bad_model_index_files(fixture_dir, run_dir, tmp_path) -> None:
    cases = {"not_json": '{"_class_name": "StableDiffusionPipeline",',
             "escape": json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"],
                                   "../../etc": ["transformers", "CLIPTextModel"]}),
             "missing": json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"],
                                    "vae_x": ["diffusers", "AutoencoderKL"]}),
             "no_unet": json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]})}
    fragments = {"not_json": "not valid JSON", "escape": "component name '../../etc' is not a folder name",
                 "missing": "a component folder model_index.json names is missing", "no_unet": "names no unet"}
    for name, text in cases.items():
        source = tmp_path / name
        shutil.copytree(fixture_dir / "sd15", source)
        (source / "model_index.json").write_text(text)
        code, _, stderr = export("--checkpoint", run_dir, "--pipeline", source, "--out", tmp_path / "out")
        assert code == 2 and fragments[name] in stderr, (name, stderr)
        one_line_error("export_diffusers", stderr)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# export_diffusers: what --out may be

def _refusal_cases(fixture_dir: Path, run_dir: Path, tmp: Path) -> list[tuple[Path, str]]:
    other_run = tmp / "other_run"
    other_run.mkdir()
    (other_run / "metrics.jsonl").write_text("{}\n")
    only_ckpts = tmp / "only_checkpoints"
    (only_ckpts / "checkpoints").mkdir(parents=True)
    only_log = tmp / "only_log"
    only_log.mkdir()
    (only_log / "train.log").write_text("x\n")
    steps = tmp / "steps"
    (steps / "step-00000005").mkdir(parents=True)
    (steps / "step-00000005" / "COMPLETE").write_text("5\n")
    checkpoint = tmp / "checkpoint"
    shutil.copytree(run_dir / "checkpoints" / "step-00000001", checkpoint)
    pipeline = tmp / "pipeline"
    shutil.copytree(fixture_dir / "sd15", pipeline)
    evaluation = tmp / "evaluation"
    evaluation.mkdir()
    common.write_marker(evaluation, "evaluate", ["summary.md"])
    (evaluation / "summary.md").write_text("# results\n")
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    a_file = tmp / "a_file"
    a_file.write_text("mine\n")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    (tmp / "loop_a").symlink_to(tmp / "loop_b")
    (tmp / "loop_b").symlink_to(tmp / "loop_a")
    return [
        (other_run, "--out holds a dde run (metrics.jsonl)"),
        (only_ckpts, "--out holds a dde run (checkpoints/)"),
        (only_log, "--out holds a dde run (train.log)"),
        (steps, "--out holds a dde run's checkpoints (step-00000005/COMPLETE)"),
        (checkpoint, "--out holds a dde checkpoint"),
        (pipeline, "--out holds a diffusers pipeline (model_index.json not written by a dde tool)"),
        (run_dir, "--out holds an input"),
        (run_dir / "checkpoints", "--out holds an input"),
        (run_dir / "checkpoints" / "step-00000002", "--out is an input"),
        (run_dir / "checkpoints" / "step-00000002" / "exported", "--out lies inside an input"),
        (run_dir / "checkpoints" / "step-00000001" / "exported", "--out lies inside a dde checkpoint"),
        (fixture_dir / "sd15", "--out is an input"),
        (fixture_dir, "--out holds an input"),
        (fixture_dir / "sd15" / "exported", "--out lies inside an input"),
        (evaluation, "--out is the output of evaluate"),
        (notes, "--out is not an output of export_diffusers"),
        (a_file, "--out exists and is not a folder"),
        (a_file / "sub", "a part of the path is a file"),
        (tmp / "dangling", "a dangling symbolic link"),
        (tmp / "dangling" / "sub", "a dangling symbolic link on the way"),
        (tmp / "loop_a", "a symbolic link loop"),
        (tmp / "loop_a" / "sub", "a symbolic link loop"),
    ]


def test_an_out_that_is_not_an_earlier_export_is_refused_untouched(fixture_dir, run_dir, tmp_path) -> None:
    cases = _refusal_cases(fixture_dir, run_dir, tmp_path)
    before = {"tmp": snapshot(tmp_path), "run": snapshot(run_dir), "fixtures": snapshot(fixture_dir)}
    for out, fragment in cases:
        code, _, stderr = export("--checkpoint", run_dir, "--pipeline", fixture_dir / "sd15", "--out", out)
        assert code == 2 and fragment in stderr, (out, stderr)
        assert str(out) in stderr
        one_line_error("export_diffusers", stderr)
    assert {"tmp": snapshot(tmp_path), "run": snapshot(run_dir), "fixtures": snapshot(fixture_dir)} == before


def test_an_earlier_export_is_replaced_and_a_foreign_file_refused(fixture_dir, run_dir, tmp_path) -> None:
    out = tmp_path / "out"
    first = run_dir / "checkpoints" / "step-00000001"
    assert export("--checkpoint", first, "--out", out)[0] == 0
    assert json.loads((out / common.MARKER).read_text())["entries"] == ["dde_export.json", "unet"]
    code, _, stderr = export("--checkpoint", run_dir, "--pipeline", fixture_dir / "sd15", "--out", out)
    assert code == 0, stderr
    assert json.loads((out / "dde_export.json").read_text())["step"] == 2 and (out / "vae").is_dir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    code, _, stderr = export("--checkpoint", first, "--out", out)
    assert code == 2 and "--out holds files export_diffusers did not write" in stderr and "notes.txt" in stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_an_export_without_marker_is_recognised(fixture_dir, run_dir, tmp_path) -> None:
    """Outputs of the earlier export_diffusers (no marker, dde_export.json) can be replaced."""
    out = tmp_path / "out"
    assert export("--checkpoint", run_dir, "--pipeline", fixture_dir / "sd15", "--out", out)[0] == 0
    (out / common.MARKER).unlink()
    code, _, stderr = export("--checkpoint", run_dir / "checkpoints" / "step-00000001", "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [common.MARKER, "dde_export.json", "unet"]


def test_a_leftover_staging_folder_of_a_killed_export_is_removed(run_dir, tmp_path) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"out{common.STAGING_INFIX}{int(dead.stdout)}"
    leftover.mkdir()
    common.write_marker(leftover, "export_diffusers", [])
    (leftover / "unet").mkdir()
    foreign = tmp_path / f"out{common.STAGING_INFIX}1"  # pid 1 lives, and the folder is not marked
    foreign.mkdir()
    assert export("--checkpoint", run_dir, "--out", out)[0] == 0
    assert not leftover.exists() and foreign.is_dir()


# ---------------------------------------------------------------------------------------------
# export_diffusers: a damaged or absurd UNet config, refused before anything is allocated

@pytest.fixture
def step_copy(run_dir, tmp_path) -> Path:
    step = tmp_path / "step-00000002"
    shutil.copytree(run_dir / "checkpoints" / "step-00000002", step)
    return step


def _allocations(monkeypatch) -> list[str]:
    """Records every UNet built outside the meta device, and every weights file loaded."""
    from diffusers import UNet2DConditionModel

    real = []
    from_config = UNet2DConditionModel.from_config.__func__

    def recording_from_config(cls, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            real.append("model")
        return from_config(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_config", classmethod(recording_from_config))
    import safetensors.torch

    load = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: real.append("weights") or load(*a, **k))
    return real


@pytest.mark.parametrize("change, fragment", [
    ({"cross_attention_dim": 10**9}, "cross_attention_dim is 1000000000: expected numbers in 0..16384"),
    ({"block_out_channels": [2048, 4096], "layers_per_block": 6}, "tensor names do not match the UNet config"),
    ({"block_out_channels": [64, 128]}, "has shape"),
    ({"down_block_types": ["DownBlock2D"] * 100}, "down_block_types is"),
    ({"attention_head_dim": [0, 0]}, "diffusers cannot build a UNet from this config"),
    ({"layers_per_block": -3}, "layers_per_block is -3"),
    ({"sample_size": "huge"}, "sample_size is huge: expected numbers"),
])
def test_an_absurd_unet_config_is_refused_before_allocating(step_copy, tmp_path, monkeypatch, change,
                                                             fragment) -> None:
    config_path = step_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text()) | change
    config_path.write_text(json.dumps(config))
    allocated = _allocations(monkeypatch)
    code, _, stderr = export("--checkpoint", step_copy, "--out", tmp_path / "out")
    assert code == 2 and fragment in stderr, stderr
    one_line_error("export_diffusers", stderr)
    assert allocated == [] and not (tmp_path / "out").exists()


def test_a_sane_config_allocates_once(step_copy, tmp_path, monkeypatch) -> None:
    allocated = _allocations(monkeypatch)
    assert export("--checkpoint", step_copy, "--out", tmp_path / "out")[0] == 0
    assert allocated == ["model", "weights"]


# ---------------------------------------------------------------------------------------------
# export_diffusers: write failures

def test_a_read_only_parent_is_named(run_dir, tmp_path, monkeypatch) -> None:
    parent = tmp_path / "readonly"
    parent.mkdir()
    original = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == parent:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, stderr = export("--checkpoint", run_dir, "--out", parent / "out")
    assert code == 2 and "cannot create a folder next to --out" in stderr and f"a writable {parent}" in stderr
    assert "Read-only file system (EROFS)" in stderr
    one_line_error("export_diffusers", stderr)
    assert list(parent.iterdir()) == []


def test_disk_full_is_named_and_the_earlier_export_kept(fixture_dir, run_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    assert export("--checkpoint", run_dir, "--out", out)[0] == 0
    before = snapshot(out)
    copies, original = [], shutil.copyfile

    def disk_full(source, target, *args, **kwargs):
        copies.append(target)
        if len(copies) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    code, _, stderr = export("--checkpoint", run_dir, "--pipeline", fixture_dir / "sd15", "--out", out)
    assert code == 1, stderr
    assert f"{copies[-1]}: No space left on device (ENOSPC): no space left on the device" in stderr
    assert f"{out} was left as it was" in stderr and "Traceback" not in stderr
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))


@pytest.mark.parametrize("with_pipeline", [False, True])
def test_file_too_large_is_named(fixture_dir, run_dir, tmp_path, with_pipeline) -> None:
    """A real EFBIG (ulimit -f 600 KB): from the UNet's safetensors writer, or from a copied component."""
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1")
    pipeline = ["--pipeline", str(fixture_dir / "sd15")] if with_pipeline else []
    proc = subprocess.run([sys.executable, "-m", "dde_tools.export_diffusers", "--checkpoint", str(run_dir),
                           "--out", str(tmp_path / "out"), *pipeline], env=env, capture_output=True, text=True,
                          preexec_fn=_file_size_limit, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "File too large (EFBIG): file too large for this file system" in proc.stderr
    assert re.search(r"out\.dde-staging-\d+/(unet|vae|text_encoder)/", proc.stderr), proc.stderr
    one_line_error("export_diffusers", proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Every entry point: one bad input as a user runs it

ENTRY_POINTS = {"export_diffusers", "export_pickapic", "evaluate", "relabel", "plot_run", "fixtures",
                "annotator_fixtures", "readme_tables", "caption_set", "clip_vocab", "ftfy_tables"}
NOT_MINE = {"export_models"}  # tested by test_export_models.py


def test_every_entry_point_has_a_case() -> None:
    with_main = {p.stem for p in (SCRIPTS / "dde_tools").glob("*.py")
                 if re.search(r"^def main\(|^if __name__ == .__main__.:", p.read_text(), re.M)}
    assert with_main - NOT_MINE == ENTRY_POINTS


def _cases(fixture_dir: Path, run_dir: Path, tmp: Path, annotator_flags: dict) -> dict[str, tuple[list[str], str]]:
    bad_index = tmp / "bad_pipeline"
    shutil.copytree(fixture_dir / "sd15", bad_index)
    (bad_index / "model_index.json").write_text("{not json")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a cat\n")
    not_parquet = tmp / "x.parquet"
    not_parquet.write_text("caption,label_0\n")
    cut = tmp / "cut_run"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 0.5}\n{"kind": "step", "step": 2}\n')
    a_file = tmp / "a_file"
    a_file.write_text("mine\n")
    other_run = tmp / "other_run"
    other_run.mkdir()
    (other_run / "metrics.jsonl").write_text("{}\n")
    parquet = str(fixture_dir / "pickapic" / "train-00000.parquet")
    return {
        "export_diffusers": (["--checkpoint", str(run_dir), "--out", str(other_run)],
                             "--out holds a dde run (metrics.jsonl)"),
        "export_pickapic": (["--parquet", parquet, "--out", str(other_run)], "--out holds a dde run (metrics.jsonl)"),
        "evaluate": (["--pipeline", str(bad_index), "--prompts", str(prompts), "--out", str(tmp / "eval"),
                      *annotator_flags["clip"]], "model_index.json does not parse"),
        "relabel": (["--parquet", str(not_parquet), "--out", str(tmp / "relabelled"), *annotator_flags["clip"]],
                    "not a Parquet file"),
        "plot_run": ([str(cut)], "a step record without a valid 'loss'"),
        "fixtures": (["--out", str(a_file)], "--out exists and is not a folder"),
        "annotator_fixtures": (["--out", str(other_run)], "--out holds a dde run (metrics.jsonl)"),
        "readme_tables": (["--run", f"0={run_dir}", "--readme", str(a_file)], "no single quickstart block"),
        "caption_set": (["--out", str(other_run)], "--out is a folder"),
        "clip_vocab": (["--out", str(a_file)], "--out exists and is not a folder"),
        "ftfy_tables": (["--out", str(other_run)], "--out is a folder"),
    }


@pytest.mark.parametrize("tool", sorted(ENTRY_POINTS))
def test_bad_input_exits_2_with_one_line(tool, fixture_dir, run_dir, annotator_flags, tmp_path) -> None:
    argv, fragment = _cases(fixture_dir, run_dir, tmp_path, annotator_flags)[tool]
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"dde_tools.{tool}", *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith(f"{tool}: error: ")]
    assert len(error) == 1 and fragment in error[0], proc.stderr
    assert "expected" in error[0] and len(error[0]) < 700, error[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing removed
