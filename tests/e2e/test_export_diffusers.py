"""The round trip back to diffusers: dde_train checkpoint -> python -m dde_tools.export_diffusers ->
UNet2DConditionModel / DiffusionPipeline, on the tiny SD1.5 and SDXL fixtures.

The C++ policy is the exported TorchScript UNet blocks (fixtures/export/<family>/unet/*.pt), composed
as the trainer composes them (unet_blocks.run_blocks; the C++ composition itself is checked against
diffusers by tests/python/test_unet_blocks.py), whose parameters hold the checkpoint's tensors:
exactly what dde_train trained. The exported diffusers UNet must reproduce its output within 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_train, tiny_overrides
from dde_tools.export_models import quiet_torchscript
from dde_tools.unet_blocks import Block, run_blocks

STEPS = 3
WEIGHTS = "diffusion_pytorch_model.safetensors"
PARITY_TOL = 1e-4


def export_diffusers(*args: str | Path) -> subprocess.CompletedProcess:
    """python -m dde_tools.export_diffusers ARGS, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    return subprocess.run([sys.executable, "-m", "dde_tools.export_diffusers", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, dde_train, fixtures, tmp_path_factory) -> dict:
    """A few dde steps at lr 1e-3 on one family, exported as a full pipeline folder."""
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    run = root / "run"
    sets = tiny_overrides(fixtures, family, run) + [
        f"train.max_steps={STEPS}", f"checkpoint.every={STEPS}", "optim.warmup_steps=0", "optim.lr=1e-3"]
    result = run_train(dde_train, "tiny_dde.yaml", sets)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = run / "checkpoints" / f"step-{STEPS:08d}"
    assert (checkpoint / "COMPLETE").is_file()
    out = root / "pipeline"
    exported = export_diffusers("--checkpoint", checkpoint, "--out", out,
                                "--pipeline", fixtures / "source" / family)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    return {"family": family, "checkpoint": checkpoint, "out": out, "source": fixtures / "source" / family,
            "export": fixtures / "export" / family}


def test_the_exported_unet_holds_the_trained_weights(trained):
    unet = UNet2DConditionModel.from_pretrained(trained["out"] / "unet")
    source = UNet2DConditionModel.from_pretrained(trained["source"] / "unet")
    saved = load_file(str(trained["checkpoint"] / "unet" / WEIGHTS))
    state, before = unet.state_dict(), source.state_dict()
    assert state.keys() == saved.keys() == before.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), f"{name}: exported tensor differs from the checkpoint's"
    # Training moved every tensor (AdamW at lr 1e-3 with weight decay: no parameter can stay put).
    unchanged = [name for name in state if torch.equal(state[name], before[name])]
    assert not unchanged, f"{len(unchanged)} tensors equal the source pipeline's: {unchanged[:5]}"
    assert unet.config.cross_attention_dim == source.config.cross_attention_dim


def test_the_exported_pipeline_loads_with_the_trained_unet(trained):
    pipe = DiffusionPipeline.from_pretrained(trained["out"])
    want = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[trained["family"]]
    assert type(pipe).__name__ == want
    saved = load_file(str(trained["checkpoint"] / "unet" / WEIGHTS))
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # The other components are the source pipeline's, unchanged.
    source_vae = load_file(str(trained["source"] / "vae" / WEIGHTS))
    for name, tensor in pipe.vae.state_dict().items():
        assert torch.equal(tensor, source_vae[name]), name
    info = json.loads((trained["out"] / "dde_export.json").read_text())
    assert Path(info["checkpoint"]) == trained["checkpoint"].resolve()


def test_the_exported_unet_reproduces_the_cpp_policy(trained):
    manifest = json.loads((trained["export"] / "manifest.json").read_text())
    saved = load_file(str(trained["checkpoint"] / "unet" / WEIGHTS))
    policy, names = [], set()
    with quiet_torchscript(), torch.no_grad():
        for entry in manifest["unet"]["blocks"]:
            rules = [(r["prefix"], r["diffusers"]) for r in entry["params"]]
            block = Block(entry["name"], entry["kind"], None, rules, entry["pops"], entry["push_output"],
                          entry["takes_size"])
            module = torch.jit.load(str(trained["export"] / entry["file"])).eval()
            for name, param in module.named_parameters():
                diffusers_name = block.diffusers_name(name)
                param.copy_(saved[diffusers_name])
                names.add(diffusers_name)
            policy.append((block, module))
    assert names == set(saved)
    unet = UNet2DConditionModel.from_pretrained(trained["out"] / "unet").eval()
    source = UNet2DConditionModel.from_pretrained(trained["source"] / "unet").eval()

    gen = torch.Generator().manual_seed(0)
    latent = manifest["latent"]
    batch, channels, size = 3, latent["channels"], manifest["resolution"] // latent["downsample"]
    sample = torch.randn(batch, channels, size, size, generator=gen)
    timestep = torch.tensor([3, 500, 999], dtype=torch.int64)
    text = torch.randn(batch, 77, manifest["unet"]["cross_attention_dim"], generator=gen)
    inputs, added = (sample, timestep, text), {}
    if manifest["unet"]["added_cond"] is not None:
        text_embeds = torch.randn(batch, manifest["unet"]["added_cond"]["text_embeds_dim"], generator=gen)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0],
                                 [128.0, 64.0, 0.0, 32.0, 64.0, 64.0]])
        inputs += (text_embeds, time_ids)
        added = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
    with torch.no_grad():
        cpp_policy = run_blocks(policy, *inputs)
        exported = unet(sample, timestep, text, **added).sample
        untrained = source(sample, timestep, text, **added).sample
    err = (cpp_policy - exported).abs().max().item()
    moved = (cpp_policy - untrained).abs().max().item()
    print(f"{trained['family']}: max |C++ policy - exported diffusers UNet| = {err:.3e} "
          f"(vs the untrained UNet: {moved:.3e})")
    assert err <= PARITY_TOL
    # The comparison is sensitive: the untrained UNet is far off on the same input.
    assert moved > 100 * PARITY_TOL


@pytest.fixture
def sd15_checkpoint(dde_train, fixtures, tmp_path) -> Path:
    """A copy of a fresh 1-step sd15 checkpoint the error tests may damage."""
    run = tmp_path / "run"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=1", "checkpoint.every=1"]
    result = run_train(dde_train, "tiny_dde.yaml", sets)
    assert result.returncode == 0, result.stderr[-4000:]
    copy = tmp_path / "step"
    shutil.copytree(run / "checkpoints" / "step-00000001", copy)
    return copy


def _expect_refused(checkpoint: Path, out: Path, *parts: str) -> None:
    result = export_diffusers("--checkpoint", checkpoint, "--out", out)
    assert result.returncode == 2, result.stdout + result.stderr
    for part in parts:
        assert part in result.stderr, f"{part!r} not in: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_checkpoint_without_complete_is_refused(sd15_checkpoint, tmp_path):
    (sd15_checkpoint / "COMPLETE").unlink()
    _expect_refused(sd15_checkpoint, tmp_path / "out", str(sd15_checkpoint), "no COMPLETE marker")


def test_a_missing_tensor_is_named(sd15_checkpoint, tmp_path):
    path = sd15_checkpoint / "unet" / WEIGHTS
    tensors = load_file(str(path))
    del tensors["conv_in.weight"]
    save_file(tensors, str(path))
    _expect_refused(sd15_checkpoint, tmp_path / "out", str(path), "missing ['conv_in.weight']")


def test_a_tensor_of_the_wrong_shape_is_named(sd15_checkpoint, tmp_path):
    path = sd15_checkpoint / "unet" / WEIGHTS
    tensors = load_file(str(path))
    tensors["conv_out.bias"] = torch.zeros(7)
    save_file(tensors, str(path))
    _expect_refused(sd15_checkpoint, tmp_path / "out", "conv_out.bias has shape (7,)", "expects (4,)")


def test_a_non_finite_tensor_is_named(sd15_checkpoint, tmp_path):
    path = sd15_checkpoint / "unet" / WEIGHTS
    tensors = load_file(str(path))
    tensors["time_embedding.linear_1.weight"][0, 0] = float("nan")
    save_file(tensors, str(path))
    _expect_refused(sd15_checkpoint, tmp_path / "out", "time_embedding.linear_1.weight holds non-finite values")


def test_a_truncated_weights_file_is_named(sd15_checkpoint, tmp_path):
    path = sd15_checkpoint / "unet" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_refused(sd15_checkpoint, tmp_path / "out", str(path), "not a readable safetensors file")


def test_an_unreadable_unet_config_is_named(sd15_checkpoint, tmp_path):
    config = sd15_checkpoint / "unet" / "config.json"
    config.write_text('{"_class_name": "UNet2DConditionModel",')
    _expect_refused(sd15_checkpoint, tmp_path / "out", str(config), "not a readable diffusers UNet config")


# ---------------------------------------------------------------------------------------------
# A run folder as --checkpoint; what --out may be (tests/python/test_tool_bad_input.py has the rest)

def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def two_step_run(dde_train, fixtures, tmp_path_factory) -> Path:
    """A real sd15 run with complete checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("two_steps") / "run"
    sets = tiny_overrides(fixtures, "sd15", run) + ["train.max_steps=2", "checkpoint.every=1"]
    result = run_train(dde_train, "tiny_dde.yaml", sets)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    return run


@pytest.mark.parametrize("given", ["", "latest", "checkpoints/latest"])
def test_a_run_folder_exports_its_newest_complete_step(two_step_run, fixtures, tmp_path, given):
    out = tmp_path / "pipeline"
    result = export_diffusers("--checkpoint", two_step_run / given if given else two_step_run, "--out", out,
                              "--pipeline", fixtures / "source" / "sd15")
    assert result.returncode == 0, result.stdout + result.stderr
    step = two_step_run / "checkpoints" / "step-00000002"
    assert f"exporting {step} (the newest complete step of {two_step_run})" in result.stdout
    info = json.loads((out / "dde_export.json").read_text())
    assert info["step"] == 2 and Path(info["checkpoint"]) == step.resolve()
    saved = load_file(str(step / "unet" / WEIGHTS))
    assert all(torch.equal(t, saved[n]) for n, t in load_file(str(out / "unet" / WEIGHTS)).items())
    DiffusionPipeline.from_pretrained(out)


def test_the_run_folder_as_out_is_refused_and_kept(two_step_run, tmp_path):
    """The bug of issue 16: --out RUN deleted the run's checkpoints and exited 0."""
    before = _snapshot(two_step_run)
    for checkpoint in (two_step_run, two_step_run / "checkpoints" / "step-00000001"):
        result = export_diffusers("--checkpoint", checkpoint, "--out", two_step_run)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--out holds an input" in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other"
    shutil.copytree(two_step_run, other)
    result = export_diffusers("--checkpoint", two_step_run, "--out", other)
    assert result.returncode == 2 and "--out holds a dde run (metrics.jsonl)" in result.stderr
    assert _snapshot(two_step_run) == before and _snapshot(other) == before
    assert sorted(p.name for p in two_step_run.parent.iterdir()) == ["run"]  # no staging folder left


def test_only_the_components_of_the_source_pipeline_are_copied(two_step_run, fixtures, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(fixtures / "source" / "sd15", source)
    (source / "v1-5-pruned.ckpt").write_bytes(os.urandom(2_000_000))
    (source / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(os.urandom(500_000))
    out = tmp_path / "pipeline"
    result = export_diffusers("--checkpoint", two_step_run, "--out", out, "--pipeline", source)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (out / "v1-5-pruned.ckpt").exists()
    assert not (out / "vae" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (out / "dde_fixture.json").exists()  # not a component: the fixture's stamp stays behind
    DiffusionPipeline.from_pretrained(out)
