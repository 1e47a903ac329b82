"""Parity of the C++ Adafactor (src/train/adafactor.cpp) with transformers' own `Adafactor`, set
up as the Diffusion-DPO SDXL launcher does (scale_parameter=False, relative_step=False,
warmup_init=False, clip_threshold=1.0, the config's lr and weight decay), over 10 steps of a
recorded gradient sequence, driven through the tests/cpp/dde_optim_probe helper."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.optimization import Adafactor

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("DDE_BUILD_DIR", REPO / "build"))
PROBE = BUILD_DIR / "tests" / "cpp" / "dde_optim_probe"

STEPS = 10
WEIGHT_DECAY = 1e-2
# A linear weight (factored), a bias (full second moment) and a conv kernel (factored over the
# last two dims of a 4-D tensor), as in a UNet.
SHAPES = {"linear.weight": (6, 5), "linear.bias": (5,), "conv.weight": (4, 3, 3, 3)}


def lr_at(step: int) -> float:
    """Warm-up from 0 as the trainer's constant_with_warmup (3 steps), then constant 1e-2."""
    return 1e-2 * min(1.0, step / 3)


def make_inputs(seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    params = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    # Gradients on different scales per step, so the update clipping (RMS > 1) engages on some.
    grads = [{name: torch.randn(shape, generator=g) * 10.0 ** (k % 4 - 2) for name, shape in SHAPES.items()}
             for k in range(STEPS)]
    return params, grads


def run_transformers(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]]):
    tensors = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    opt = Adafactor(list(tensors.values()), lr=lr_at(0), scale_parameter=False, relative_step=False,
                    warmup_init=False, clip_threshold=1.0, weight_decay=WEIGHT_DECAY)
    for k in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        for name, p in tensors.items():
            p.grad = grads[k][name].clone()
        opt.step()
        opt.zero_grad()
    return {name: p.detach() for name, p in tensors.items()}, {name: opt.state[p] for name, p in tensors.items()}


def run_probe(tmp_path: Path, params, grads) -> dict[str, torch.Tensor]:
    if not PROBE.is_file():
        pytest.fail(f"{PROBE} is not built: run `cmake --build {BUILD_DIR} --target dde_optim_probe`, "
                    "or point DDE_BUILD_DIR at the build folder that has it")
    inputs = {f"param.{name}": p for name, p in params.items()}
    for k, step_grads in enumerate(grads):
        inputs.update({f"grad.{k}.{name}": g for name, g in step_grads.items()})
    inputs["lr"] = torch.tensor([lr_at(k) for k in range(STEPS)], dtype=torch.float64)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    result = subprocess.run([str(PROBE), "--input", str(tmp_path / "in.safetensors"), "--output",
                             str(tmp_path / "out.safetensors"), "--optimizer", "adafactor", "--weight-decay",
                             str(WEIGHT_DECAY)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return load_file(str(tmp_path / "out.safetensors"))


@pytest.mark.parametrize("seed", [0, 1])
def test_adafactor_matches_transformers_over_ten_steps(tmp_path, seed):
    params, grads = make_inputs(seed)
    expected, expected_state = run_transformers(params, grads)
    ours = run_probe(tmp_path, params, grads)
    worst = 0.0
    for name, p in expected.items():
        got = ours[f"param.{name}"]
        assert not torch.equal(got, params[name]), f"{name} did not move"
        rel = float(((got - p).abs() / p.abs().clamp_min(1e-12)).max())
        worst = max(worst, rel)
        np.testing.assert_allclose(got.numpy(), p.numpy(), rtol=1e-6, atol=0, err_msg=name)
    print(f"max relative difference of the weights after {STEPS} steps: {worst:.2e}")
    for name, state in expected_state.items():
        assert int(ours[f"state.step.{name}"]) == state["step"] == STEPS
        keys = ("exp_avg_sq_row", "exp_avg_sq_col") if len(SHAPES[name]) >= 2 else ("exp_avg_sq",)
        assert "exp_avg" not in state  # beta1 None: no first moment, on both sides
        for key in keys:
            np.testing.assert_allclose(ours[f"state.{key}.{name}"].numpy(), state[key].numpy(), rtol=1e-6,
                                       atol=0, err_msg=f"{key}.{name}")
