"""Exported graphs hold no device (issues 15 and 24): both tiny families exported, every archive
scanned and run elsewhere, and the export refusing a graph that pins a device.

torch::jit::load(path, cuda) moves parameters and buffers but not what the tracer fixed as
constants: a `Device` constant (a factory call with `device=x.device`) makes the first CUDA
forward mix a CPU tensor into a CUDA graph. Each archive the exporter writes is scanned with the
exporter's own scanner (dde_tools.device_free), every method of every submodule and every nested
block, for Device constants, for tensor constants with dimensions (they stay on the CPU too), and
for dtype constants feeding `aten::to` (they undo bf16 autocast); each archive is then run with
all its tensors moved to the meta device, as the C++ loader moves a module after loading it
(src/models/torchscript.cpp). Small traced modules show that both checks catch a device constant
and that export_models.check_device_free refuses one, naming the module and the node; an export
with diffusers' own `Timesteps` in the input block (a device constant, as a diffusers upgrade
could bring) is refused without a manifest.json. The same exports show TorchScript's deprecation
as one line on stderr, once per process, and no deprecation warning.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dde_tools import common, export_models, unet_blocks
from dde_tools.device_free import fixed_constants
from dde_tools.unet_blocks import Block, run_blocks

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
FAMILIES = ("sd15", "sdxl")
META = torch.device("meta")


@pytest.fixture(scope="module")
def device_free_exports(fixture_dir: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, list, str]]:
    """Both families exported in this process (no TorchScript note shown before), with every warning
    the export let through and its stderr."""
    result = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "_torchscript_noted", False)
        for family in FAMILIES:
            out = tmp_path_factory.mktemp(f"device_free_{family}")
            stderr = io.StringIO()
            with warnings.catch_warnings(record=True) as shown, contextlib.redirect_stderr(stderr):
                warnings.simplefilter("always")
                manifest = export_models.export_pipeline(fixture_dir / family, out)
            result[family] = (out, manifest, list(shown), stderr.getvalue())
    return result


def on_meta(path: Path) -> torch.jit.ScriptModule:
    """Load an archive on the CPU and move every parameter and buffer to the meta device."""
    module = torch.jit.load(str(path))
    for sub in module.modules():
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            sub._c.setattr(name, tensor.detach().to(META))
    return module


def archives(out: Path, manifest: dict) -> list[str]:
    """Every file the manifest names, checked to be every .pt the export wrote."""
    named = [b["file"] for b in manifest["unet"]["blocks"]] + [e["file"] for e in manifest["text_encoders"]]
    named += [manifest["vae"]["encoder"], manifest["vae"]["decoder"]]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.pt"))
    assert sorted(named) == written
    return named


@pytest.mark.parametrize("family", FAMILIES)
def test_no_archive_holds_device_or_dtype_constants(device_free_exports, family: str) -> None:
    out, manifest, _, _ = device_free_exports[family]
    problems = [f"{name} ({c.kind}): {c.describe()}" for name in archives(out, manifest)
                for c in fixed_constants(torch.jit.load(str(out / name)))]
    assert problems == []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_archive_runs_on_another_device(device_free_exports, family: str) -> None:
    out, manifest, _, _ = device_free_exports[family]
    batch, resolution = 2, manifest["resolution"]
    latent_size = resolution // manifest["latent"]["downsample"]
    channels = manifest["latent"]["channels"]

    for entry in manifest["text_encoders"]:
        ids = torch.zeros(batch, entry["max_length"], dtype=torch.long, device=META)
        hidden, pooled = on_meta(out / entry["file"])(ids)
        assert hidden.device == pooled.device == META
        assert hidden.shape == (batch, entry["max_length"], entry["hidden_size"])
        assert pooled.shape == (batch, entry["pooled_size"])

    mean, logvar = on_meta(out / manifest["vae"]["encoder"])(torch.zeros(batch, 3, resolution, resolution, device=META))
    assert mean.device == logvar.device == META and mean.shape == (batch, channels, latent_size, latent_size)
    image = on_meta(out / manifest["vae"]["decoder"])(torch.zeros(batch, channels, latent_size, latent_size, device=META))
    assert image.device == META and image.shape == (batch, 3, resolution, resolution)

    blocks = []
    for e in manifest["unet"]["blocks"]:
        block = Block(e["name"], e["kind"], None, [(p["prefix"], p["diffusers"]) for p in e["params"]],
                      e["pops"], e["push_output"], e["takes_size"])
        blocks.append((block, on_meta(out / e["file"])))
    added = manifest["unet"]["added_cond"]
    extra = [] if added is None else [torch.zeros(batch, added["text_embeds_dim"], device=META),
                                      torch.zeros(batch, added["time_ids_dim"], device=META)]
    eps = run_blocks(blocks, torch.zeros(batch, channels, latent_size, latent_size, device=META),
                     torch.zeros(batch, dtype=torch.long, device=META),
                     torch.zeros(batch, 77, manifest["unet"]["cross_attention_dim"], device=META), *extra)
    assert eps.device == META and eps.shape == (batch, channels, latent_size, latent_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_lets_no_tracer_warning_through(device_free_exports, family: str) -> None:
    _, _, shown, _ = device_free_exports[family]
    tracer = [f"{w.filename}:{w.lineno}: {w.message}" for w in shown if issubclass(w.category, torch.jit.TracerWarning)]
    assert tracer == []


def test_export_states_torchscript_deprecation_once(device_free_exports) -> None:
    """One note in the first export of the process, none in the second; no deprecation warning
    gets through although the fixture shows every warning ("always")."""
    notes = {family: [line for line in device_free_exports[family][3].splitlines() if "note:" in line]
             for family in FAMILIES}
    assert notes["sdxl"] == [] and len(notes["sd15"]) == 1
    assert notes["sd15"][0].startswith('dde_tools: note: torch says "`torch.jit.trace` is deprecated.')
    assert "requirements.txt" in notes["sd15"][0] and "docs/architecture.md" in notes["sd15"][0]
    deprecations = [str(w.message) for family in FAMILIES for w in device_free_exports[family][2]
                    if re.search(common.TORCHSCRIPT_DEPRECATION, str(w.message))]
    assert deprecations == []


def test_torchscript_note_lets_other_warnings_through(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common, "_torchscript_noted", False)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with common.torchscript_deprecation_noted():
            for _ in range(2):
                warnings.warn("`torch.jit.load` is deprecated. Please switch to `torch.export`.", DeprecationWarning)
            warnings.warn("`torch.jit.load` is deprecated, but as another category", FutureWarning)
            warnings.warn("some other deprecation", DeprecationWarning)
    assert [str(w.message) for w in shown] == ["`torch.jit.load` is deprecated, but as another category",
                                               "some other deprecation"]
    assert capsys.readouterr().err.count("dde_tools: note:") == 1


class _Positions(nn.Module):
    """What transformers and diffusers do: a factory call on the input's device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], device=x.device)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Positions()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_the_checks_catch_a_device_constant_in_a_submodule(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    with export_models.quiet_torchscript():
        torch.jit.save(torch.jit.trace(_Outer(), (torch.zeros(2, 5),)), str(path))
    found = fixed_constants(torch.jit.load(str(path)))
    assert [(c.kind, c.module, c.method) for c in found] == [("device", "inner", "forward")]
    assert found[0].node.endswith('Device = prim::Constant[value="cpu"]()') and "aten::arange at " in found[0].used_by
    with pytest.raises(RuntimeError, match="device"):
        on_meta(path)(torch.zeros(2, 5, device=META))


class _Cast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.offsets = torch.arange(5.0)  # a plain attribute, not a buffer: traced as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) + self.offsets


def test_the_checks_catch_a_dtype_cast_and_a_tensor_constant(tmp_path: Path) -> None:
    path = tmp_path / "cast.pt"
    with export_models.quiet_torchscript():
        torch.jit.save(torch.jit.trace(_Cast(), (torch.zeros(2, 5, dtype=torch.float64),)), str(path))
    found = fixed_constants(torch.jit.load(str(path)))
    assert sorted(c.kind for c in found) == ["dtype_to", "tensor"]


# --- The export refuses a graph that pins a device --------------------------------------------


class _Factory(nn.Module):
    """x plus a tensor that `build` makes from x."""

    def __init__(self, build) -> None:
        super().__init__()
        self.build = build

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.build(x)


class _Buffered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.arange(5.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offsets


PINNING = {  # each traced as a Device constant "cpu" feeding the named op
    "arange": lambda x: torch.arange(x.shape[-1]),
    "zeros": lambda x: torch.zeros(x.shape, device="cpu"),
    "ones": lambda x: torch.ones(x.shape),
}
DEVICE_FREE = {
    "zeros_like": lambda x: torch.zeros_like(x),
    "new_ones": lambda x: x.new_ones(x.shape),
}


def _traced(inner: nn.Module, tmp_path: Path) -> torch.jit.ScriptModule:
    """`inner` as submodule 'inner' of a module with a parameter, traced, saved and reloaded."""
    outer = _Outer()
    outer.inner = inner
    path = tmp_path / "tiny.pt"
    with export_models.quiet_torchscript():
        torch.jit.save(torch.jit.trace(outer, (torch.zeros(2, 5),)), str(path))
        return torch.jit.load(str(path))


@pytest.mark.parametrize("op", sorted(PINNING))
def test_check_device_free_names_module_and_node(op: str, tmp_path: Path) -> None:
    with pytest.raises(export_models.DeviceConstantError) as refused:
        export_models.check_device_free([("tiny.pt", _traced(_Factory(PINNING[op]), tmp_path))])
    message = str(refused.value)
    assert message.startswith("device check failed for tiny.pt: 1 constant(s) fixed to the device")
    assert re.search(r"\n  tiny\.pt: module 'inner', method forward: "
                     r"%\w+ : Device = prim::Constant\[value=\"cpu\"\]\(\), "
                     rf"used by aten::{op} at {re.escape(__file__)}\(\d+\): <lambda>\n", message)
    assert "torch.zeros_like(x)" in message and message.endswith("No manifest.json was written.")


def test_check_device_free_names_a_tensor_constant(tmp_path: Path) -> None:
    with pytest.raises(export_models.DeviceConstantError) as refused:
        export_models.check_device_free([("cast.pt", _traced(_Cast(), tmp_path))])
    message = str(refused.value)
    assert ("cast.pt: module 'inner', method forward: " in message
            and ": Tensor = prim::Constant (a float32 tensor of shape [5] on cpu), used by aten::add at " in message)
    assert "register_buffer" in message


@pytest.mark.parametrize("inner", [*DEVICE_FREE, "buffer"])
def test_check_device_free_passes_a_device_free_module(inner: str, tmp_path: Path) -> None:
    module = _Buffered() if inner == "buffer" else _Factory(DEVICE_FREE[inner])
    export_models.check_device_free([("tiny.pt", _traced(module, tmp_path))])


def test_export_refuses_diffusers_timesteps(fixture_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """diffusers' own Timesteps in the input block, as an upgrade could bring back: its
    `arange(device=timesteps.device)` passes the CPU parity check; the export names it and stops
    before any other component and before manifest.json."""
    monkeypatch.setattr(unet_blocks, "SinusoidalTimesteps", lambda timesteps: timesteps)
    out = tmp_path / "out"
    assert export_models.main(["--pipeline", str(fixture_dir / "sd15"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "\nexport_models: device check failed for unet/input.pt: 1 constant(s)" in "\n" + err
    assert re.search(r"\n  unet/input\.pt: module 'time_proj', method forward: %\w+ : Device = "
                     r"prim::Constant\[value=\"cpu\"\]\(\), used by aten::arange at \S+/diffusers/models/"
                     r"embeddings\.py\(\d+\): get_timestep_embedding\n", err)
    assert not (out / "manifest.json").exists() and not (out / "text_encoder.pt").exists()
