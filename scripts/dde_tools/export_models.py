"""Export a diffusers SD1.5/SDXL pipeline as TorchScript components + manifest.json (docs/formats.md §1).

CLI: python -m dde_tools.export_models --pipeline DIR --out OUT [--resolution N] [--max-abs-err E]

Each component is traced (fp32, CPU, eval, dropout p set to 0) at batch 2, saved, reloaded
with torch.jit.load and compared with diffusers at batch 3 on fresh random inputs. The UNet
is traced block by block (unet_blocks.py) so that the trainer can checkpoint each block; its
reloaded blocks are composed as the trainer composes them and compared with diffusers' whole
forward (batch 3, and batch 1 at an odd latent size). The measured max abs errors go to stdout
and into the manifest; any error above the limit
(default 1e-4) exits 1 without writing manifest.json. Bad input folders exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dde_tools.common import vocab_sha256, write_json_atomic
from dde_tools.unet_blocks import UnsupportedUNet, block_inputs, run_blocks, split_unet

MANIFEST_VERSION = 2  # 2: the UNet as separately traced blocks (unet_blocks.py)
MAX_ABS_ERR = 1e-4
TRACE_BATCH, CHECK_BATCH = 2, 3
FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
HIDDEN_OUTPUT = {"sd15": "last", "sdxl": "penultimate"}  # docs/method.md §9: SDXL uses hidden_states[-2]
TIME_IDS_DIM = 6  # [orig_h, orig_w, crop_top, crop_left, target_h, target_w]


class ExportError(Exception):
    """A problem with the input pipeline folder (exit code 2)."""


class ParityError(Exception):
    """A reloaded component differs from diffusers by more than the limit (exit code 1)."""


class TextEncoder(nn.Module):
    """forward(input_ids) -> (hidden, pooled): hidden is `last` or `penultimate` (docs/method.md §9)."""

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, hidden_output: str) -> None:
        super().__init__()
        self.model = model
        self.penultimate = hidden_output == "penultimate"
        self.projected = isinstance(model, CLIPTextModelWithProjection)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        pooled = out.text_embeds if self.projected else out.pooler_output
        return hidden, pooled


class VaeEncoder(nn.Module):
    """forward(image in [-1, 1]) -> (mean, logvar); mirrors AutoencoderKL.encode + DiagonalGaussianDistribution."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)


class VaeDecoder(nn.Module):
    """forward(latents / scaling_factor) -> image; mirrors AutoencoderKL.decode."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


@dataclass
class Component:
    """One exported file: the module to trace, how to make inputs, and the diffusers reference."""

    name: str
    module: nn.Module
    make_inputs: Callable[[int, torch.Generator], tuple[Tensor, ...]]
    reference: Callable[..., Tensor | tuple[Tensor, ...]]


def remove_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0: a traced dropout ignores train()/eval()."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        elif isinstance(vars(sub).get("dropout"), float):  # e.g. CLIPAttention.dropout
            sub.dropout = 0.0


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence tracer warnings and TorchScript's deprecation notices.

    TorchScript is deprecated since torch 2.11, yet torch::jit::load is the only way to load
    a whole model into C++ (libtorch-notes.md); the parity check stands in for the warnings.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _conv_to_conv2d(graph: torch._C.Graph) -> int:
    """Rewrite traced `aten::_convolution` (2-D, not transposed) as `aten::conv2d`; return the count.

    The tracer records convolutions below the op that autocast dispatches on: a traced
    `aten::_convolution` ignores bf16 autocast, so convolutions would stay fp32 under
    train.precision: bf16 and fail on bf16 weights (model.frozen_dtype: bf16).
    """
    changed = 0
    for node in list(graph.nodes()):
        for block in node.blocks():
            changed += _conv_to_conv2d(block)
        if node.kind() != "aten::_convolution":
            continue
        inp, weight, bias, stride, padding, dilation, transposed, _output_padding, groups = list(node.inputs())[:9]
        if transposed.node().kind() != "prim::Constant" or transposed.toIValue() or len(weight.type().sizes() or []) not in (0, 4):
            continue
        conv2d = graph.create("aten::conv2d", [inp, weight, bias, stride, padding, dilation, groups])
        conv2d.insertBefore(node)
        conv2d.output().setType(node.output().type())
        node.output().replaceAllUsesWith(conv2d.output())
        node.destroy()
        changed += 1
    return changed


def _trace(module: nn.Module, inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
    for sub in traced.modules():
        if hasattr(sub, "forward") and "forward" in getattr(sub, "_c")._method_names():
            _conv_to_conv2d(sub.graph)
    return traced


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from err


def detect_family(pipeline: Path) -> str:
    """'sd15' or 'sdxl' from model_index.json's _class_name."""
    index_path = pipeline / "model_index.json"
    class_name = _read_json(index_path).get("_class_name")
    if class_name not in FAMILIES:
        raise ExportError(f"{index_path}: _class_name is {class_name!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[class_name]


def latent_downsample(pipeline: Path) -> int:
    """Pixels per latent cell: the VAE halves the size once per block after the first."""
    return 2 ** (len(_read_json(pipeline / "vae" / "config.json")["block_out_channels"]) - 1)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def _token_ids(tokenizer: CLIPTokenizer, batch: int, gen: torch.Generator) -> Tensor:
    """Random prompts shaped like tokenizer output: BOS, tokens, EOS at a random place, padding."""
    length = tokenizer.model_max_length
    ids = torch.randint(0, len(tokenizer) - 2, (batch, length), generator=gen)
    ends = torch.randint(1, length, (batch,), generator=gen)
    positions = torch.arange(length).expand(batch, length)
    ids[positions > ends[:, None]] = tokenizer.pad_token_id
    ids[positions == ends[:, None]] = tokenizer.eos_token_id
    ids[:, 0] = tokenizer.bos_token_id
    return ids


def _unet_inputs(cfg, family: str, resolution: int, size: int, batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """Random UNet inputs: (sample, timestep, encoder_hidden_states[, text_embeds, time_ids])."""
    inputs = (
        _randn(gen, batch, cfg.in_channels, size, size),
        torch.randint(0, 1000, (batch,), generator=gen, dtype=torch.int64),
        _randn(gen, batch, 77, cfg.cross_attention_dim),
    )
    if family == "sdxl":
        text_embeds_dim = cfg.projection_class_embeddings_input_dim - TIME_IDS_DIM * cfg.addition_time_embed_dim
        time_ids = torch.randint(0, resolution + 1, (batch, TIME_IDS_DIM), generator=gen).float()
        inputs += (_randn(gen, batch, text_embeds_dim), time_ids)
    return inputs


def _diffusers_unet(unet: UNet2DConditionModel, family: str, inputs: tuple[Tensor, ...]) -> Tensor:
    sample, timestep, text, *added = inputs
    kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if family == "sdxl" else {}
    return unet(sample, timestep, text, return_dict=False, **kwargs)[0]


def export_unet(pipeline: Path, family: str, resolution: int, downsample: int, out: Path) -> tuple[list[dict], dict[str, float]]:
    """Trace the UNet block by block into OUT/unet/<block>.pt; return the manifest entries and parity.

    Parity: the reloaded blocks, composed as the C++ UNet composes them (unet_blocks.run_blocks),
    against diffusers' forward at CHECK_BATCH on the export size and at batch 1 on a latent half
    that size rounded up to an odd number of cells (so the explicit upsample sizes are exercised).
    The diffusers outputs are computed before tracing and the model is freed before the reload,
    so only one copy of the weights is held at a time (SDXL at full size needs that).
    """
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", torch_dtype=torch.float32).eval()
    remove_dropout(unet)
    size = resolution // downsample
    checks = {
        "unet": _unet_inputs(unet.config, family, resolution, size, CHECK_BATCH, torch.Generator().manual_seed(1)),
        "unet_batch1_odd": _unet_inputs(unet.config, family, resolution, size // 2 + 1, 1, torch.Generator().manual_seed(2)),
    }
    with torch.no_grad():
        want = {name: _diffusers_unet(unet, family, inputs) for name, inputs in checks.items()}
    blocks = split_unet(unet)
    trace_inputs = _unet_inputs(unet.config, family, resolution, size, TRACE_BATCH, torch.Generator().manual_seed(0))
    recorded = block_inputs(blocks, *trace_inputs)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    with quiet_torchscript():
        for block in blocks:
            torch.jit.save(_trace(block.module, recorded[block.name]), str(out / "unet" / f"{block.name}.pt"))
    entries = [block.entry() for block in blocks]
    for block in blocks:
        block.module = None  # type: ignore[assignment]
    del unet
    with quiet_torchscript():
        loaded = [(block, torch.jit.load(str(out / "unet" / f"{block.name}.pt"))) for block in blocks]
    parity = {}
    with torch.no_grad():
        for name, inputs in checks.items():
            got = run_blocks(loaded, *inputs)
            parity[name] = (got - want[name]).abs().max().item() if got.shape == want[name].shape else float("inf")
    return entries, parity


def _text_component(pipeline: Path, name: str, tokenizer_name: str, family: str) -> Component:
    model_cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    model = model_cls.from_pretrained(pipeline, subfolder=name, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(pipeline / tokenizer_name)
    module = TextEncoder(model, HIDDEN_OUTPUT[family])
    return Component(name, module, lambda batch, gen: (_token_ids(tokenizer, batch, gen),), module)


def _vae_components(pipeline: Path, resolution: int, downsample: int) -> list[Component]:
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae", torch_dtype=torch.float32)
    size = resolution // downsample

    def encode(image: Tensor) -> tuple[Tensor, Tensor]:
        dist = vae.encode(image).latent_dist
        return dist.mean, dist.logvar

    return [
        Component(
            "vae_encoder",
            VaeEncoder(vae),
            lambda batch, gen: (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1,),
            encode,
        ),
        Component(
            "vae_decoder",
            VaeDecoder(vae),
            lambda batch, gen: (_randn(gen, batch, vae.config.latent_channels, size, size),),
            lambda latents: vae.decode(latents).sample,
        ),
    ]


def _as_tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def max_abs_error(loaded: torch.jit.ScriptModule, component: Component, seed: int = 1) -> float:
    """Max abs difference between a reloaded TorchScript module and diffusers at CHECK_BATCH."""
    inputs = component.make_inputs(CHECK_BATCH, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = _as_tuple(loaded(*inputs))
        want = _as_tuple(component.reference(*inputs))
    if [g.shape for g in got] != [w.shape for w in want]:
        return float("inf")
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def export_component(component: Component, out: Path) -> float:
    """Trace, save as OUT/<name>.pt, reload and return the measured max abs error."""
    component.module.eval()
    remove_dropout(component.module)
    inputs = component.make_inputs(TRACE_BATCH, torch.Generator().manual_seed(0))
    path = out / f"{component.name}.pt"
    with quiet_torchscript():
        torch.jit.save(_trace(component.module, inputs), str(path))
        loaded = torch.jit.load(str(path))
    return max_abs_error(loaded, component)


def _text_encoder_entry(pipeline: Path, name: str, tokenizer_name: str, family: str) -> dict:
    config = _read_json(pipeline / name / "config.json")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline / tokenizer_name)
    projected = name == "text_encoder_2"
    empty = tokenizer("", padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    return {
        "name": name,
        "file": f"{name}.pt",
        "tokenizer": tokenizer_name,
        "hidden_output": HIDDEN_OUTPUT[family],
        "hidden_size": config["hidden_size"],
        "pooled_size": config["projection_dim"] if projected else config["hidden_size"],
        "max_length": tokenizer.model_max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_sha256": vocab_sha256(pipeline / tokenizer_name),
        "empty_prompt_ids": empty.input_ids,
    }


def build_manifest(pipeline: Path, family: str, resolution: int) -> dict:
    """manifest.json (version 1) as docs/formats.md §1 describes it, parity errors still empty."""
    unet_config = _read_json(pipeline / "unet" / "config.json")
    vae_config = _read_json(pipeline / "vae" / "config.json")
    scheduler_config = _read_json(pipeline / "scheduler" / "scheduler_config.json")
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    encoders = [_text_encoder_entry(pipeline, n, n.replace("text_encoder", "tokenizer"), family) for n in names]
    text_dim = sum(e["hidden_size"] for e in encoders)
    if unet_config["cross_attention_dim"] != text_dim:
        raise ExportError(
            f"{pipeline / 'unet' / 'config.json'}: cross_attention_dim is {unet_config['cross_attention_dim']}, "
            f"expected {text_dim} (the text encoders' hidden sizes {[e['hidden_size'] for e in encoders]})"
        )
    added_cond = None
    if family == "sdxl":
        time_dim = TIME_IDS_DIM * unet_config["addition_time_embed_dim"]
        added_cond = {
            "text_embeds_dim": unet_config["projection_class_embeddings_input_dim"] - time_dim,
            "time_ids_dim": TIME_IDS_DIM,
        }
    return {
        "format": "dde-manifest",
        "version": MANIFEST_VERSION,
        "family": family,
        "source": str(pipeline.resolve()),
        "torch_version": torch.__version__.split("+")[0],
        "resolution": resolution,
        "latent": {
            "channels": vae_config["latent_channels"],
            "downsample": latent_downsample(pipeline),
            "scaling_factor": vae_config["scaling_factor"],
        },
        "schedule": {
            key: scheduler_config[key]
            for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        },
        "unet": {
            "blocks": [],  # filled by export_unet, in execution order
            "cross_attention_dim": unet_config["cross_attention_dim"],
            "added_cond": added_cond,
            "config": unet_config,
        },
        "text_encoders": encoders,
        "text_embedding": {
            "concat": names,
            "dim": text_dim,
            "pooled_from": "text_encoder_2" if family == "sdxl" else None,
        },
        "vae": {"encoder": "vae_encoder.pt", "decoder": "vae_decoder.pt"},
        "dropout_removed": True,
        "parity_max_abs_err": {},
    }


def export_pipeline(pipeline: Path, out: Path, resolution: int | None = None, limit: float = MAX_ABS_ERR) -> dict:
    """Export every component of `pipeline` into `out`; return the manifest.

    Raises ExportError for a bad input folder and ParityError when a parity check fails.
    """
    pipeline = Path(pipeline)
    family = detect_family(pipeline)
    downsample = latent_downsample(pipeline)
    if resolution is None:
        resolution = _read_json(pipeline / "unet" / "config.json")["sample_size"] * downsample
    if resolution <= 0 or resolution % downsample:
        raise ExportError(f"--resolution {resolution}: expected a positive multiple of {downsample}")
    manifest = build_manifest(pipeline, family, resolution)  # checks the configs before the slow part
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)

    encoders = manifest["text_encoders"]
    builders: list[Callable[[], list[Component]]] = [
        *(lambda e=e: [_text_component(pipeline, e["name"], e["tokenizer"], family)] for e in encoders),
        lambda: _vae_components(pipeline, resolution, downsample),
    ]
    manifest["unet"]["blocks"], parity = export_unet(pipeline, family, resolution, downsample, out)
    for name, err in parity.items():
        print(f"parity {name}: max_abs_err={err:.3e} (limit {limit:.0e})")
    manifest["parity_max_abs_err"] = parity
    for build in builders:  # one diffusers model in memory at a time
        for component in build():
            parity[component.name] = export_component(component, out)
            print(f"parity {component.name}: max_abs_err={parity[component.name]:.3e} (limit {limit:.0e})")
    failed = [f"{name}: max_abs_err={err:.3e}" for name, err in parity.items() if not err <= limit]
    if failed:
        raise ParityError(f"parity check failed (limit {limit:.0e}) for " + "; ".join(failed))

    for entry in encoders:
        shutil.copytree(pipeline / entry["tokenizer"], out / entry["tokenizer"], dirs_exist_ok=True)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, required=True, help="diffusers pipeline folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resolution", type=int, help="training image size in pixels (default: the UNet's)")
    parser.add_argument("--max-abs-err", type=float, default=MAX_ABS_ERR, help="parity limit (default 1e-4)")
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        manifest = export_pipeline(args.pipeline, args.out, args.resolution, args.max_abs_err)
    except (ExportError, UnsupportedUNet) as err:
        print(f"export_models: error: {err}", file=sys.stderr)
        return 2
    except ParityError as err:
        print(f"export_models: {err}", file=sys.stderr)
        return 1
    print(f"export_models: {manifest['family']} pipeline {args.pipeline} -> {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
