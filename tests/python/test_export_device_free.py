"""Exported graphs hold no device (issue 15): both tiny families exported, every archive scanned and run elsewhere.

torch::jit::load(path, cuda) moves parameters and buffers but not what the tracer fixed as
constants: a `Device` constant (a factory call with `device=x.device`) makes the first CUDA
forward mix a CPU tensor into a CUDA graph. Each archive the exporter writes is scanned, every
method of every submodule and every nested block, for Device constants, for tensor constants
with dimensions (they stay on the CPU too), and for dtype constants feeding `aten::to` (they
undo bf16 autocast); each archive is then run with all its tensors moved to the meta device,
as the C++ loader moves a module after loading it (src/models/torchscript.cpp). A small traced
module with `torch.arange(n, device=x.device)` shows that both checks catch a device constant.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from dde_tools import export_models
from dde_tools.unet_blocks import Block, run_blocks

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
FAMILIES = ("sd15", "sdxl")
META = torch.device("meta")


@pytest.fixture(scope="module")
def device_free_exports(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, list]]:
    """Both families exported in this process, with every warning the export let through."""
    result = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"device_free_{family}")
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            manifest = export_models.export_pipeline(fixture_dir / family, out)
        result[family] = (out, manifest, list(shown))
    return result


def _nodes(block: torch._C.Block | torch._C.Graph) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def method_graphs(module: torch.jit.ScriptModule, prefix: str = "") -> Iterator[tuple[str, torch._C.Graph]]:
    """(qualified method name, graph) of every method of `module` and of all its submodules."""
    for name in module._c._method_names():
        yield f"{prefix}{name}", module._c._get_method(name).graph
    for child_name, child in module.named_children():
        yield from method_graphs(child, f"{prefix}{child_name}.")


def fixed_constants(module: torch.jit.ScriptModule) -> dict[str, list[str]]:
    """The constants that pin a device or a dtype, by kind, each as 'method: node'."""
    found: dict[str, list[str]] = {"device": [], "tensor": [], "dtype_to": []}
    for where, graph in method_graphs(module):
        for node in _nodes(graph):
            text = f"{where}: {str(node).strip()}"
            if node.kind() == "prim::Constant":
                kind = node.output().type().kind()
                if kind == "DeviceObjType":
                    found["device"].append(text)
                elif kind == "TensorType" and node.output().toIValue().dim() > 0:
                    found["tensor"].append(text)
            elif node.kind() == "aten::to":
                schema = torch._C.parse_schema(node.schema())
                for arg, value in zip(schema.arguments, node.inputs()):
                    if (arg.name == "dtype" and value.node().kind() == "prim::Constant"
                            and value.toIValue() is not None):
                        found["dtype_to"].append(text)
    return found


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
    out, manifest, _ = device_free_exports[family]
    problems = {}
    for name in archives(out, manifest):
        found = fixed_constants(torch.jit.load(str(out / name)))
        problems.update({f"{name} ({kind})": nodes for kind, nodes in found.items() if nodes})
    assert problems == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_archive_runs_on_another_device(device_free_exports, family: str) -> None:
    out, manifest, _ = device_free_exports[family]
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
    _, _, shown = device_free_exports[family]
    tracer = [f"{w.filename}:{w.lineno}: {w.message}" for w in shown if issubclass(w.category, torch.jit.TracerWarning)]
    assert tracer == []


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
    assert len(found["device"]) == 1 and found["device"][0].startswith("inner.forward: ")
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
    assert len(found["dtype_to"]) == 1 and len(found["tensor"]) == 1 and found["device"] == []
