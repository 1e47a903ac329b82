"""LoRA in dde_train (model.lora, docs/method.md §8.2) on the tiny fixtures.

- At step 0 the policy is the base: every pair of the first step has the policy's errors equal to
  the reference's (Delta = 0 exactly) and the held-out accuracy is 0, as for full fine-tuning.
- Every method trains with adapters; the reference is the base with its adapters off (one UNet).
- Checkpoints hold the adapters (lora/), their optimizer state and the base's identity; a resume
  is bit-identical, also with ZeRO-1 over two ranks, and a resume on another base is refused
  naming both.
- export_diffusers --lora loads in diffusers with load_lora_weights, and diffusers' errors of a
  dumped micro-batch equal the trainer's within a few float32 noise floors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, default_dtype, read_records, run_train, tiny_overrides
from test_forward_parity import recompute_errors
from test_multiprocess import finish, launch

torch.set_num_threads(1)

LORA = "model.lora={rank: 4, alpha: 8, targets: [to_q, to_k, to_v, to_out.0]}"
METHODS = ["dde", "dde_single", "dde_step", "uniform", "uniform_ct", "discounted", "sft", "mapo"]


def lora_run(dde_train, fixtures, out: Path, family: str = "sd15", *sets: str, resume: bool = False,
             held_out: bool = False):
    args = tiny_overrides(fixtures, family, out, held_out=held_out) + [
        LORA, "optim.warmup_steps=0", "optim.lr=1e-2", "checkpoint.every=2", "checkpoint.keep=5", *sets]
    return run_train(dde_train, "tiny_dde.yaml", args, resume=resume)


def adapters(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "lora" / "adapter_model.safetensors"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_policy_is_the_base_at_step_0_and_only_adapters_are_saved(dde_train, fixtures, tmp_path, family):
    out = tmp_path / "run"
    r = lora_run(dde_train, fixtures, out, family, "train.max_steps=2", "eval.every=2", "eval.t_bins=[300, 700]",
                 held_out=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "LoRA: rank 4, alpha 8 (scale 2)" in log and "adapters off (LoRA: one UNet in memory)" in log
    first = [p for p in read_records(out, "pair") if p["step"] == 1]
    assert first and all(p["mse_policy_w"] == p["mse_ref_w"] and p["mse_policy_l"] == p["mse_ref_l"]
                         for p in first)
    evals = read_records(out, "eval")
    assert evals[0]["step"] == 0 and evals[0]["implicit_acc"] == 0.0
    assert all(d == 0.0 for d in evals[0]["delta_by_t"])
    assert any(d != 0.0 for d in evals[-1]["delta_by_t"])  # the adapters moved the policy
    step = out / "checkpoints" / "step-00000002"
    assert not (step / "unet").exists()
    meta = json.loads((step / "lora" / "lora.json").read_text())
    assert (meta["format"], meta["rank"], meta["alpha"]) == ("dde-lora", 4, 8.0)
    assert meta["targets"] == ["to_q", "to_k", "to_v", "to_out.0"] and len(meta["base"]["unet_sha256"]) == 64
    weights = adapters(out, 2)
    assert len(weights) == 2 * len(meta["modules"])
    for module in meta["modules"]:
        a, b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
        assert a.shape[0] == 4 and b.shape[1] == 4 and a.dtype == b.dtype == torch.float32
        assert b.abs().max() > 0  # trained from zero
    # the optimizer state is the adapters' only: AdamW's exp_avg, exp_avg_sq and step of each
    state = load_file(str(step / "training_state.safetensors"))
    optimizer = [k.split(".", 1) for k in state if not k.startswith("correction.")]
    assert {kind for kind, _ in optimizer} == {"exp_avg", "exp_avg_sq", "step"}
    assert {name for _, name in optimizer} == set(weights)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_adapters(dde_train, fixtures, tmp_path, method):
    out = tmp_path / method
    sets = ["train.max_steps=2", f"method.name={method}", "train.gradient_checkpointing=true"]
    if method == "dde":
        sets.append("train.precision=bf16")
    r = lora_run(dde_train, fixtures, out, "sd15", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_records(out, "step")) == 2
    pairs = read_records(out, "pair")
    assert pairs and all(p["loss"] is not None for p in pairs)
    if method in ("sft", "mapo"):
        assert all(p["mse_ref_w"] is None for p in pairs)
        assert "reference UNet: none" in (out / "train.log").read_text()
    assert adapters(out, 2)


def test_resume_is_bit_identical_and_refused_on_another_base(dde_train, fixtures, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("train.gradient_checkpointing=true",)
    r = lora_run(dde_train, fixtures, straight, "sd15", "train.max_steps=4", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = lora_run(dde_train, fixtures, resumed, "sd15", "train.max_steps=2", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = lora_run(dde_train, fixtures, resumed, "sd15", "train.max_steps=4", *common, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapters(straight, 4), adapters(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = [load_file(str(run / "checkpoints" / "step-00000004" / "training_state.safetensors"))
             for run in (straight, resumed)]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert read_records(straight, "pair")[-8:] == read_records(resumed, "pair")[-8:]

    # Another base: the export with one UNet weight changed (same architecture, same names).
    other = tmp_path / "other_export"
    shutil.copytree(fixtures / "export" / "sd15", other)
    manifest = json.loads((other / "manifest.json").read_text())
    unit = other / manifest["unet"]["blocks"][-1]["file"]
    with warnings.catch_warnings():  # torch.jit's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(unit))
        with torch.no_grad():
            next(iter(module.parameters())).add_(1e-3)
        module.save(str(unit))
    r = lora_run(dde_train, fixtures, resumed, "sd15", "train.max_steps=6", *common,
                 f"model.manifest={other / 'manifest.json'}", resume=True)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "resuming LoRA adapters on another base model" in r.stderr
    assert str(fixtures / "export" / "sd15" / "manifest.json") in r.stderr and str(other / "manifest.json") in r.stderr
    # and a full run cannot resume a LoRA checkpoint (nor the other way round)
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", resumed) + ["train.max_steps=6"],
                  resume=True)
    assert r.returncode == 1 and "resuming full training from a LoRA checkpoint" in r.stderr


def test_zero1_over_two_ranks_resumes_bit_identically(dde_train, fixtures, tmp_path):
    sets = lambda out, steps: tiny_overrides(fixtures, "sd15", out) + [  # noqa: E731
        LORA, "optim.warmup_steps=0", "optim.lr=1e-2", "checkpoint.every=2", "checkpoint.keep=5",
        "dist.shard_optimizer=true", "train.micro_batch=1", f"train.max_steps={steps}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert all(rc == 0 for rc, _ in finish(launch(dde_train, 2, sets(straight, 4)))), "straight"
    assert all(rc == 0 for rc, _ in finish(launch(dde_train, 2, sets(resumed, 2)))), "first half"
    results = finish(launch(dde_train, 2, sets(resumed, 4), resume=True))
    assert all(rc == 0 for rc, _ in results), [e[-2000:] for _, e in results]
    a, b = adapters(straight, 4), adapters(resumed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards = sorted(p.name for p in (straight / "checkpoints" / "step-00000004").glob("optimizer-rank-*"))
    assert shards == ["optimizer-rank-00000.safetensors", "optimizer-rank-00001.safetensors"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_lora_loads_in_diffusers_and_gives_the_trainers_errors(dde_train, fixtures, tmp_path, family):
    out = tmp_path / "run"
    r = lora_run(dde_train, fixtures, out, family, "train.max_steps=2", "checkpoint.every=1",
                 "logging.dump_step=2", "data.caption_dropout=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    exported = tmp_path / "lora"
    subprocess.run([sys.executable, "-m", "dde_tools.export_diffusers", "--lora", "--checkpoint",
                    str(out / "checkpoints" / "step-00000001"), "--out", str(exported)],
                   check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "scripts"), "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    dump = load_file(str(out / "debug" / "step-00000002-rank-00000.safetensors"))
    pipeline = fixtures / "source" / family

    def policy(dtype):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(pipeline, torch_dtype=dtype)
        pipe.load_lora_weights(exported)
        return pipe.unet.to(dtype)

    errors = {torch.float32: recompute_errors(dump, pipeline, out, family, torch.float32, policy=policy)}
    with default_dtype(torch.float64):
        errors[torch.float64] = recompute_errors(dump, pipeline, out, family, torch.float64, policy=policy)
    want, single = errors[torch.float64], errors[torch.float32]
    assert not torch.equal(want["e_policy_w"], want["e_ref_w"])  # the adapters moved the policy
    floor = max(((single[n] - want[n]).abs() / want[n].abs()).max().item() for n in want)
    for name, exact in want.items():
        rel = ((dump[name].double() - exact).abs() / exact.abs()).max().item()
        print(f"[ lora parity ] {family} {name}: relative difference to float64 {rel:.3e} (float32 floor {floor:.3e})")
        assert rel <= 8 * floor + 1e-12, name
