"""The per-block UNet, run by the C++ code (tests/cpp/tools/dde_unet_probe), against diffusers.

Forward parity with UNet2DConditionModel at batch 1 and 3 (both tiny families, with and without
gradient checkpointing), gradients of every parameter against diffusers' autograd, and the Python
block composition (unet_blocks.run_blocks) the exporter checks itself with.

Bounds: diffusers runs in float32 and in float64; the C++ float32 result must lie within 8 times
the float32 noise floor (diffusers float32 against float64, measured in the test on this CPU's
kernels) of the float64 value. The floor follows the processor's kernel set; a wrong block, order
or weight is off by orders of magnitude more.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dde_tools import unet_blocks

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("DDE_BUILD_DIR", REPO / "build"))
PROBE = BUILD_DIR / "tests" / "cpp" / "dde_unet_probe"
FLOORS = 8  # the C++ float32 result lies within this many float32 noise floors of float64

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")


def make_inputs(unet: UNet2DConditionModel, family: str, batch: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, 4, size, size, generator=gen),
        "t": torch.randint(0, 1000, (batch,), generator=gen),
        "text": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen),
    }
    if family == "sdxl":
        inputs["pooled"] = torch.randn(batch, 32, generator=gen)
        # (orig_h, orig_w, crop_top, crop_left, target_h, target_w): distinct values, so an
        # order mix-up changes the output.
        inputs["time_ids"] = torch.tensor([[96.0, 80, 12, 4, 64, 64]]).repeat(batch, 1) + torch.arange(batch)[:, None]
    return inputs


def diffusers_forward(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {}
    if "pooled" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    return unet(inputs["x"], inputs["t"], inputs["text"], **kwargs).sample


def as_double(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def exact_and_floor(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """diffusers' output in float64, and the float32 noise floor: max |float32 - float64|."""
    with torch.no_grad():
        single = diffusers_forward(unet, inputs)
        exact = diffusers_forward(copy.deepcopy(unet).double(), as_double(inputs))
    return exact, (single.double() - exact).abs().max().item()


def run_probe(manifest: Path, inputs: dict[str, torch.Tensor], tmp_path: Path, *flags: str) -> dict[str, torch.Tensor]:
    if not PROBE.is_file():
        pytest.fail(f"{PROBE} is not built: run `cmake --build {BUILD_DIR} --target dde_unet_probe`")
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(src))
    proc = subprocess.run(
        [str(PROBE), "--manifest", str(manifest), "--input", str(src), "--output", str(dst), *flags],
        capture_output=True, text=True, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    return load_file(str(dst))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cpp_blocks_match_diffusers(exports, tmp_path: Path, family: str, batch: int, checkpointing: bool) -> None:
    export = exports[family]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").eval()
    inputs = make_inputs(unet, family, batch, size=8, seed=10 + batch)
    flags = ("--backward", "--checkpointing") if checkpointing else ()
    got = run_probe(export.out / "manifest.json", inputs, tmp_path, *flags)["eps"]
    exact, floor = exact_and_floor(unet, inputs)
    err = (got.double() - exact).abs().max().item()
    print(f"[ unet blocks ] {family} batch {batch} checkpointing {checkpointing}: max abs err to float64 "
          f"{err:.3e} (diffusers float32: {floor:.3e})")
    assert err <= FLOORS * floor


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cpp_block_gradients_match_diffusers(exports, tmp_path: Path, family: str) -> None:
    """Every diffusers parameter, under its diffusers name, gets diffusers' gradient (checkpointed)."""
    export = exports[family]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").train()
    inputs = make_inputs(unet, family, batch=2, size=8, seed=3)
    got = run_probe(export.out / "manifest.json", inputs, tmp_path, "--backward", "--checkpointing")
    exact_unet = copy.deepcopy(unet).double()
    (diffusers_forward(unet, inputs) * inputs["x"]).sum().backward()
    exact_inputs = as_double(inputs)
    (diffusers_forward(exact_unet, exact_inputs) * exact_inputs["x"]).sum().backward()
    names = {f"grad.{n}" for n, _ in unet.named_parameters()}
    assert names == {k for k in got if k.startswith("grad.")}
    # Gradients that are zero analytically (a per-channel bias before a one-channel-per-group
    # GroupNorm) are rounding noise: below 1e-3 of the model's largest, compare at that scale.
    exact = dict(exact_unet.named_parameters())
    model_scale = max(p.grad.abs().max().item() for p in exact.values())
    errors, floors = {}, {}
    for name, param in unet.named_parameters():
        want = exact[name].grad
        own = want.abs().max().item()
        scale = model_scale if own < 1e-3 * model_scale else own
        errors[name] = (got[f"grad.{name}"].double() - want).abs().max().item() / scale
        floors[name] = (param.grad.double() - want).abs().max().item() / scale
    floor = max(floors.values())  # diffusers' own float32 noise, over every parameter
    print(f"[ unet blocks ] {family} gradients: worst relative error to float64 {max(errors.values()):.3e} "
          f"(diffusers float32: {floor:.3e})")
    for name, err in errors.items():
        assert err <= FLOORS * floor, name


def test_odd_latent_size_uses_explicit_upsample_sizes(exports, tmp_path: Path) -> None:
    """A latent that is not a multiple of 2**num_upsamplers: diffusers forwards the skip sizes."""
    export = exports["sdxl"]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").eval()
    inputs = make_inputs(unet, "sdxl", batch=2, size=7, seed=4)
    got = run_probe(export.out / "manifest.json", inputs, tmp_path)["eps"]
    exact, floor = exact_and_floor(unet, inputs)
    assert got.shape == exact.shape and (got.double() - exact).abs().max().item() <= FLOORS * floor


def test_frozen_bf16_blocks_stay_close_to_fp32(exports, tmp_path: Path) -> None:
    export = exports["sd15"]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").eval()
    inputs = make_inputs(unet, "sd15", batch=2, size=8, seed=5)
    got = run_probe(export.out / "manifest.json", inputs, tmp_path, "--frozen-dtype", "bf16")["eps"]
    with torch.no_grad():
        want = diffusers_forward(unet, inputs)
    rel = (got - want).abs().max().item() / want.abs().max().item()
    assert 1e-4 < rel < 5e-2  # bf16 rounding: present, and no more than that


def test_python_composition_of_reloaded_blocks(exports) -> None:
    """unet_blocks.run_blocks over the exported files (what export_models' parity check runs)."""
    export = exports["sd15"]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").eval()
    blocks = unet_blocks.split_unet(unet)
    loaded = [(b, torch.jit.load(str(export.out / "unet" / f"{b.name}.pt"))) for b in blocks]
    inputs = make_inputs(unet, "sd15", batch=3, size=8, seed=6)
    with torch.no_grad():
        got = unet_blocks.run_blocks(loaded, inputs["x"], inputs["t"], inputs["text"])
    exact, floor = exact_and_floor(unet, inputs)
    assert (got.double() - exact).abs().max().item() <= FLOORS * floor
    traced_names = [block.diffusers_name(name) for block, module in loaded for name, _ in module.named_parameters()]
    assert sorted(traced_names) == sorted(n for n, _ in unet.named_parameters())  # each exactly once


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_time_projections_are_diffusers_bit_for_bit(exports, family: str) -> None:
    """input.pt's sinusoidal projections (int64 step buffer, no device constant) equal diffusers' Timesteps."""
    export = exports[family]
    unet = UNet2DConditionModel.from_pretrained(export.pipeline, subfolder="unet").eval()
    loaded = torch.jit.load(str(export.out / "unet" / "input.pt"))
    steps = torch.arange(1000)
    pairs = [(loaded.time_proj, unet.time_proj, steps)]
    if family == "sdxl":  # time ids: sizes and crops in pixels, as floats
        pairs.append((loaded.add_time_proj, unet.add_time_proj, torch.arange(0.0, 4097.0, 0.5)))
    with torch.no_grad():
        for exported, reference, values in pairs:
            got, want = exported(values), reference(values)
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
