"""Export a diffusers SD1.5/SDXL pipeline as TorchScript components + manifest.json (docs/formats.md §1).

CLI: python -m dde_tools.export_models --pipeline DIR --out OUT [--resolution N] [--max-abs-err E]

Each component is traced (fp32, CPU, eval, dropout p set to 0) at batch 2, saved, reloaded
with torch.jit.load and compared with diffusers at batch 3 on fresh random inputs. The UNet
is traced block by block (unet_blocks.py) so that the trainer can checkpoint each block; its
reloaded blocks are composed as the trainer composes them and compared with diffusers' whole
forward (batch 3, and batch 1 at an odd latent size). The measured max abs errors go to stdout
and into the manifest; any error above the limit
(default 1e-4) exits 1 without writing manifest.json. Each reloaded archive is scanned for
constants that pin a device (device_free.py: every method of every submodule); one found exits 1
naming the archive, the module and the node, without writing manifest.json. Bad input folders
exit 2 with one message (check_configs runs before any model is built).

The traced graphs fix no device and no dtype (device_free.py, tests/python/test_export_device_free.py).
The C++ trainer loads them onto a GPU and may cast frozen models to bf16 and run them under autocast,
and the tracer turns `device=x.device` into a `prim::Constant` "cpu" and `.to(x.dtype)` into a
constant float32, neither of which follows the module. Where diffusers/transformers build
tensors on a device or cast to a traced dtype, the traced code is our own:
  - the UNet's sinusoidal time projections: unet_blocks.SinusoidalTimesteps (an int64 buffer);
    `.to(sample.dtype)` / `.to(emb.dtype)` in the input block: `type_as`;
  - the CLIP causal mask and pooled-row index: TextEncoder (a bool buffer; a gather);
  - attention (UNet and VAE): CastFreeAttnProcessor drops AttnProcessor2_0's `.to(query.dtype)`,
    which traced as a float32 cast of every attention output (under bf16 autocast an fp32 copy
    that the output projection casts back).
No `aten::to` with a constant dtype is left. Before this, the tiny SD1.5/SDXL exports held
(Device constants / dtype constants feeding aten::to): unet/input.pt 1/2 (SDXL 2/4: two
`.float()`, two `.to(dtype)`), text_encoder*.pt 1/3 (the mask's `.to(float32)`, two int32 casts
of the ids), 2 in each cross-attention UNet block (mid block, down_blocks.1.0, up_blocks.0.*),
1 in each VAE part.
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
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dde_tools.common import file_sha256, torchscript_deprecation_noted, vocab_sha256, write_json_atomic
from dde_tools.device_free import device_constants
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


class DeviceConstantError(Exception):
    """An exported graph holds a constant that would not follow it to the GPU (exit code 1)."""


class TextEncoder(nn.Module):
    """forward(input_ids) -> (hidden, pooled): hidden is `last` or `penultimate` (docs/method.md §9).

    The CLIP text transformer's forward (transformers 4.57, CLIPTextTransformer) run from its
    submodules, so that the traced graph holds no device: transformers builds the causal mask and
    the pooling row index with `device=hidden_states.device` factory calls, which the tracer
    fixes as `prim::Constant[value="cpu"]`. Here the causal mask is a bool buffer (True = may
    attend) of the largest length, sliced to the input's; SDPA takes a bool mask as it is, and
    the C++ loader's bf16 cast of frozen models leaves bool buffers alone. The pooled row is
    gathered with an index tensor instead of `arange(batch, device=...)`. `reference` is
    transformers' own forward, which the export compares against.
    """

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, hidden_output: str) -> None:
        super().__init__()
        if model.config._attn_implementation != "sdpa":
            raise ValueError(f"the text encoder must use SDPA attention, not {model.config._attn_implementation!r}")
        self.model = model
        self.penultimate = hidden_output == "penultimate"
        self.projected = isinstance(model, CLIPTextModelWithProjection)
        self.eos_token_id = int(model.config.eos_token_id)
        length = model.config.max_position_embeddings
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal[None, None], persistent=False)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        text = self.model.text_model
        length = input_ids.shape[-1]
        embeddings = text.embeddings
        positions = embeddings.position_ids[:, :length]
        hidden = embeddings.token_embedding(input_ids) + embeddings.position_embedding(positions)
        mask = self.causal_mask[:, :, :length, :length]
        out = text.encoder(inputs_embeds=hidden, causal_attention_mask=mask, output_hidden_states=self.penultimate)
        last = text.final_layer_norm(out.last_hidden_state)
        if self.eos_token_id == 2:  # transformers' rule for configs older than its PR #24773
            eos_at = input_ids.argmax(dim=-1)
        else:  # the first EOS; argmax of a 0/1 tensor is its first 1
            eos_at = torch.where(input_ids == self.eos_token_id, 1, 0).argmax(dim=-1)
        pooled = last.gather(1, eos_at[:, None, None].expand(-1, 1, last.shape[-1])).squeeze(1)
        if self.projected:
            pooled = self.model.text_projection(pooled)
        return (out.hidden_states[-2] if self.penultimate else last), pooled

    def reference(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The same outputs from transformers' forward."""
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


# The TracerWarnings the export expects (torch 2.11.0, diffusers 0.37.1 as pinned), each a
# (module, line) that warns "Converting a tensor to a Python boolean": a test on a traced shape,
# which the trace fixes to the outcome it had while tracing. Each outcome holds for every input
# the exported graphs are run with:
#   diffusers.models.downsampling 134, 143 and upsampling 145: `assert hidden_states.shape[1] ==
#       self.channels`; the convolution weights fix the channel count.
#   diffusers.models.upsampling 160 (`shape[0] >= 64`), 169 (the scale factor of an explicit
#       output size) and 171 (`numel() * scale > 2**31`): Upsample2D then makes its input
#       contiguous (a workaround for upsample_nearest_nhwc); traced as "no", which is exact for a
#       contiguous input: unet_blocks.Upsample passes a contiguous one, and the VAE decoder's
#       upsamplers get a resnet's output, which a convolution made contiguous.
#   torch.nn.functional 2805: group_norm's `_verify_batch_size` (more than one value per group:
#       true for any latent or image).
# Only these are filtered: a TracerWarning from any other line shows, and so do these after an
# upgrade moves them (then review them and update this list).
EXPECTED_TRACER_WARNINGS = (
    (r"diffusers\.models\.downsampling", 134),
    (r"diffusers\.models\.downsampling", 143),
    (r"diffusers\.models\.upsampling", 145),
    (r"diffusers\.models\.upsampling", 160),
    (r"diffusers\.models\.upsampling", 169),
    (r"diffusers\.models\.upsampling", 171),
    (r"torch\.nn\.functional", 2805),
)
TRACER_BOOL_WARNING = r"Converting a tensor to a Python boolean might cause the trace to be incorrect"


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Turn TorchScript's deprecation warnings into one line per process and silence the expected
    TracerWarnings (listed above).

    TorchScript is deprecated since torch 2.11, yet torch::jit::load is the only way to load
    a whole model into C++ (docs/architecture.md). Any other TracerWarning is shown.
    """
    with torchscript_deprecation_noted(), warnings.catch_warnings():
        for module, line in EXPECTED_TRACER_WARNINGS:
            warnings.filterwarnings("ignore", message=TRACER_BOOL_WARNING, category=torch.jit.TracerWarning,
                                    module=module + "$", lineno=line)
        yield


class CastFreeAttnProcessor:
    """diffusers' AttnProcessor2_0 without its final `.to(query.dtype)`, for tracing.

    That cast is a no-op in eager mode (SDPA returns the query's dtype), but the tracer records
    the example's dtype: a `.to(float32)` after every attention, which under bf16 autocast turns
    SDPA's bf16 output into fp32 only for the output projection to cast it back. The rest is
    AttnProcessor2_0's computation in its order, for the attention configurations of the SD1.5
    and SDXL UNets and VAEs (`supports`): no spatial norm, no q/k norms, no cross-attention norm,
    no attention mask.
    """

    @staticmethod
    def supports(attn: Attention) -> bool:
        return (type(attn.processor) is AttnProcessor2_0 and attn.spatial_norm is None
                and attn.norm_q is None and attn.norm_k is None and not attn.norm_cross)

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        if attention_mask is not None:
            raise ValueError("CastFreeAttnProcessor: attention masks are not supported")
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:  # [B, C, H, W] -> [B, H*W, C]
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = context.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def cast_free_attention(module: nn.Module) -> Iterator[None]:
    """Give each supported diffusers Attention in `module` a CastFreeAttnProcessor, then restore.

    Only while tracing: the diffusers references keep their own processors.
    """
    swapped = [(attn, attn.processor) for attn in module.modules()
               if isinstance(attn, Attention) and CastFreeAttnProcessor.supports(attn)]
    processor = CastFreeAttnProcessor()
    try:
        for attn, _ in swapped:
            attn.set_processor(processor)
        yield
    finally:
        for attn, original in swapped:
            attn.set_processor(original)


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
    with torch.no_grad(), cast_free_attention(module):
        traced = torch.jit.trace(module, inputs, check_trace=False)
    for sub in traced.modules():
        if hasattr(sub, "forward") and "forward" in getattr(sub, "_c")._method_names():
            _conv_to_conv2d(sub.graph)
    return traced


# What to do about each kind of constant device_free.device_constants finds.
DEVICE_CONSTANT_TODO = {
    "device": ("build the tensor from an input or a buffer: torch.zeros_like(x), x.new_zeros(...), or a buffer "
               "registered in __init__ (`device=x.device` is traced as a constant too)"),
    "tensor": ("make the tensor a buffer (register_buffer(name, tensor, persistent=False)): buffers move "
               "with the module"),
}
MAX_SHOWN_CONSTANTS = 10


def check_device_free(archives: list[tuple[str, torch.jit.ScriptModule]]) -> None:
    """Raise DeviceConstantError naming every constant of these (file name, reloaded module) pairs
    that pins a device (device_free.py): the module, the node and what uses it."""
    found = [(name, constant) for name, module in archives for constant in device_constants(module)]
    if not found:
        return
    files = ", ".join(dict.fromkeys(name for name, _ in found))
    lines = [f"  {name}: {constant.describe()}" for name, constant in found[:MAX_SHOWN_CONSTANTS]]
    if len(found) > MAX_SHOWN_CONSTANTS:
        lines.append(f"  and {len(found) - MAX_SHOWN_CONSTANTS} more")
    todo = "; ".join(DEVICE_CONSTANT_TODO[kind] for kind in dict.fromkeys(c.kind for _, c in found))
    raise DeviceConstantError(
        f"device check failed for {files}: {len(found)} constant(s) fixed to the device the export traced on; "
        "the C++ trainer moves parameters and buffers to the GPU, not these, so its first GPU step would fail "
        "(the CPU parity check cannot see them):\n" + "\n".join(lines) + "\n"
        f"What to do: in the code of the module named, {todo}; or trace a device-free copy of that code, as "
        "unet_blocks.SinusoidalTimesteps and export_models.TextEncoder do; or export with the diffusers and "
        "transformers versions pinned in requirements.txt. No manifest.json was written.")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise _bad(path, "not a JSON object", "a JSON object of settings", type(data).__name__)
    return data


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


# Limits on the sizes the configs set, checked before any model is built or any input allocated.
# The supported families sit far inside them (SDXL: UNet channels 1280, cross-attention 2048,
# 1024 px; CLIP ViT-bigG: width 1280, 32 layers, 77 positions).
MAX_RESOLUTION = 4096  # pixels per side
MAX_WIDTH = 8192  # block channels, attention and text widths
MAX_IMAGE_CHANNELS = 64  # latent channels, UNet in/out channels (SD: 4)
MAX_BLOCKS = 8  # down blocks of the UNet or the VAE
MAX_LAYERS = 64  # layers per block, transformer layers per block, text encoder layers
MAX_TOKENS = 1024  # text positions
MAX_VOCAB = 1_000_000
MAX_TIMESTEPS = 100_000
FIX_CONFIG = "Fix that value or use the complete diffusers pipeline folder the weights came with."


def _bad(where: object, what: str, expected: str, found: str, todo: str = FIX_CONFIG) -> ExportError:
    """An ExportError stating what is wrong, where, what was expected and found, and what to do."""
    return ExportError(f"{where}: {what}: expected {expected}; found {found}. {todo}")


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Config:
    """One config.json, read and checked key by key (a missing or out-of-range key is an ExportError)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = _read_json(path)

    def _get(self, key: str, expected: str, optional: bool) -> object:
        if key not in self.data:
            if optional:
                return None
            raise _bad(self.path, f"required key {key!r} is missing", expected, "no such key",
                       f"Add {key} to that file, or use the complete diffusers pipeline folder the weights came with.")
        return self.data[key]

    def int(self, key: str, lo: int, hi: int, optional: bool = False) -> int | None:
        """An integer in [lo, hi]; an optional key may be absent (None: the library's default applies)."""
        expected = f"{key} an integer in [{lo}, {hi}]"
        value = self._get(key, expected, optional)
        if value is None and optional:
            return None
        if not _is_int(value) or not lo <= value <= hi:
            raise _bad(self.path, f"{key} out of range", expected, _show(value))
        return value

    def ints(self, key: str, lo: int, hi: int, count: tuple[int, int] | None = None,
             scalar: bool = False, optional: bool = False) -> list[int]:
        """A list of integers in [lo, hi] (its length in `count`), or with `scalar` also one integer."""
        length = f"{count[0]} to {count[1]} " if count else ""
        expected = f"{key} {'an integer or ' if scalar else ''}a list of {length}integers in [{lo}, {hi}]"
        value = self._get(key, expected, optional)
        if value is None and optional:
            return []
        items = [value] if scalar and _is_int(value) else value
        if (not isinstance(items, list) or not all(_is_int(v) and lo <= v <= hi for v in items)
                or (count and not count[0] <= len(items) <= count[1])):
            raise _bad(self.path, f"{key} out of range", expected, _show(value))
        return items

    def number(self, key: str, lo: float, hi: float) -> float:
        expected = f"{key} a number in ({lo}, {hi}]"
        value = self._get(key, expected, optional=False)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo < value <= hi:
            raise _bad(self.path, f"{key} out of range", expected, _show(value))
        return float(value)

    def strings(self, key: str, count: int) -> None:
        """Optional: a list of `count` names."""
        expected = f"{key} a list of {count} names (one per entry of block_out_channels)"
        value = self._get(key, expected, optional=True)
        if value is not None and (not isinstance(value, list) or len(value) != count
                                  or not all(isinstance(v, str) for v in value)):
            raise _bad(self.path, f"{key} does not fit block_out_channels", expected, _show(value))

    def string(self, key: str) -> str:
        value = self._get(key, f"{key} a name", optional=False)
        if not isinstance(value, str):
            raise _bad(self.path, f"{key} is not a name", f"{key} a string", _show(value))
        return value


def check_configs(pipeline: Path, family: str) -> None:
    """Check the config.json keys that size anything, against the limits and against each other.

    Runs before any model is built, so that a missing key or an absurd size ends in one message
    (exit 2) instead of a traceback or an out-of-memory kill. Keys the export reads itself, or
    compares across components, are required; keys diffusers/transformers would default are
    checked when present. Sizes that do not fit the weights are found when the weights are
    loaded (_load_checked).
    """
    unet = _Config(pipeline / "unet" / "config.json")
    vae = _Config(pipeline / "vae" / "config.json")
    scheduler = _Config(pipeline / "scheduler" / "scheduler_config.json")
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    texts = {name: _Config(pipeline / name / "config.json") for name in names}

    for folder in [pipeline / "unet", pipeline / "vae", *(pipeline / name for name in names)]:
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise _bad(folder, "no weights", "a .safetensors (or .bin) weights file next to config.json", "none",
                       "Use the complete diffusers pipeline folder.")

    unet_in = unet.int("in_channels", 1, MAX_IMAGE_CHANNELS)
    unet_out = unet.int("out_channels", 1, MAX_IMAGE_CHANNELS)
    unet.int("sample_size", 1, MAX_RESOLUTION)
    blocks = len(unet.ints("block_out_channels", 1, MAX_WIDTH, count=(1, MAX_BLOCKS)))
    unet.strings("down_block_types", blocks)
    unet.strings("up_block_types", blocks)
    unet.ints("layers_per_block", 1, MAX_LAYERS, scalar=True, optional=True)
    cross = unet.int("cross_attention_dim", 1, MAX_WIDTH)
    unet.ints("attention_head_dim", 1, MAX_WIDTH, scalar=True, optional=True)
    if unet.data.get("num_attention_heads") is not None:
        unet.ints("num_attention_heads", 1, MAX_WIDTH, scalar=True)
    layers = unet.data.get("transformer_layers_per_block", 1)  # an int, one per block, or one list per block
    flat = [v for item in (layers if isinstance(layers, list) else [layers])
            for v in (item if isinstance(item, list) else [item])]
    if not flat or not all(_is_int(v) and 1 <= v <= MAX_LAYERS for v in flat):
        raise _bad(unet.path, "transformer_layers_per_block out of range",
                   f"integers in [1, {MAX_LAYERS}] (one, or one per block)", _show(layers))

    vae.ints("block_out_channels", 1, MAX_WIDTH, count=(1, MAX_BLOCKS))
    vae.int("in_channels", 3, 3, optional=True)  # RGB images
    vae.int("out_channels", 3, 3, optional=True)
    latent = vae.int("latent_channels", 1, MAX_IMAGE_CHANNELS)
    vae.ints("layers_per_block", 1, MAX_LAYERS, scalar=True, optional=True)
    vae.number("scaling_factor", 0.0, 1000.0)

    scheduler.int("num_train_timesteps", 1, MAX_TIMESTEPS)
    scheduler.number("beta_start", 0.0, 1.0)
    scheduler.number("beta_end", 0.0, 1.0)
    scheduler.string("beta_schedule")
    scheduler.string("prediction_type")

    widths = []
    for name, text in texts.items():
        width = text.int("hidden_size", 1, MAX_WIDTH)
        heads = text.int("num_attention_heads", 1, width, optional=True)
        if heads and width % heads:
            raise _bad(text.path, "hidden_size is not a multiple of num_attention_heads",
                       f"a multiple of {heads}", str(width))
        text.int("intermediate_size", 1, 4 * MAX_WIDTH, optional=True)
        text.int("num_hidden_layers", 1, MAX_LAYERS, optional=True)
        text.int("max_position_embeddings", 1, MAX_TOKENS)
        vocab = text.int("vocab_size", 1, MAX_VOCAB, optional=True)
        text.int("eos_token_id", 0, (vocab or MAX_VOCAB) - 1, optional=True)
        if name == "text_encoder_2":
            text.int("projection_dim", 1, MAX_WIDTH)
        widths.append(width)

    if not unet_in == unet_out == latent:
        raise _bad(unet.path, "in_channels/out_channels do not fit the VAE",
                   f"both equal to the VAE's latent_channels {latent} (a UNet that denoises the VAE's latents; "
                   "inpainting and other conditioned UNets are not supported)", f"{unet_in}/{unet_out}")
    if cross != sum(widths):
        raise ExportError(
            f"{unet.path}: cross_attention_dim is {cross}, "
            f"expected {sum(widths)} (the text encoders' hidden sizes {widths})"
        )
    if family == "sdxl":
        time_dim = unet.int("addition_time_embed_dim", 1, MAX_WIDTH)
        added = unet.int("projection_class_embeddings_input_dim", 1, (TIME_IDS_DIM + 1) * MAX_WIDTH)
        pooled = texts["text_encoder_2"].data["projection_dim"]
        if added != pooled + TIME_IDS_DIM * time_dim:
            raise _bad(unet.path, "projection_class_embeddings_input_dim does not fit",
                       f"{pooled + TIME_IDS_DIM * time_dim} (text_encoder_2's projection_dim {pooled} "
                       f"+ {TIME_IDS_DIM} time ids x addition_time_embed_dim {time_dim})", str(added))


def _load_checked(what: str, folder: Path, load: Callable[[], tuple[nn.Module, dict]]) -> nn.Module:
    """Run a from_pretrained(..., output_loading_info=True) and refuse weights that do not fit config.json.

    A size in config.json that differs from the weights is an error from the loader (a shape
    mismatch) or, for transformers, missing or unused weights that it would otherwise fill with
    random values or drop silently.
    """
    todo = (f"Restore the sizes in {folder / 'config.json'} to those of the weights, "
            "or use the complete diffusers pipeline folder the weights came with.")
    try:
        model, info = load()
    except (OSError, ValueError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = lines[0][:400]
        if lines[0].startswith("Error(s) in loading") and len(lines) > 1:  # torch's list of mismatches
            detail = lines[1][:400] + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
        raise _bad(folder, f"cannot load the {what} with its config.json",
                   "weights whose shapes match config.json", detail, todo) from None
    # transformers reloads position_ids, a buffer it computes, from some older checkpoints.
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")]
    for kind, keys in (("missing from the weights", info.get("missing_keys", [])), ("unused", unexpected),
                       ("of the wrong shape", info.get("mismatched_keys", []))):
        if keys:
            shown = ", ".join(str(k) for k in list(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise _bad(folder, f"the weights do not fit config.json: {len(keys)} weights {kind}",
                       "exactly the weights config.json describes", shown, todo)
    return model


TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _tokenizer(pipeline: Path, name: str) -> CLIPTokenizer:
    folder = pipeline / name
    todo = "Use the complete diffusers pipeline folder (its tokenizer folders hold these files)."
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise _bad(folder, "not a CLIP tokenizer folder", " and ".join(TOKENIZER_FILES), f"no {', '.join(missing)}", todo)
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as err:  # ImportError: transformers' report of a bad file
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise _bad(folder, "cannot load the CLIP tokenizer", "a readable vocab.json and merges.txt",
                   detail[:300], todo) from None


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
    # low_cpu_mem_usage=False: torch's own load (its list of shape mismatches), whether or not
    # accelerate is installed (peft needs it; with it diffusers would take another path).
    unet = _load_checked("UNet", pipeline / "unet", lambda: UNet2DConditionModel.from_pretrained(
        pipeline, subfolder="unet", torch_dtype=torch.float32, output_loading_info=True,
        low_cpu_mem_usage=False)).eval()
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
    check_device_free([(f"unet/{block.name}.pt", module) for block, module in loaded])
    parity = {}
    with torch.no_grad():
        for name, inputs in checks.items():
            got = run_blocks(loaded, *inputs)
            parity[name] = (got - want[name]).abs().max().item() if got.shape == want[name].shape else float("inf")
    return entries, parity


def _text_component(pipeline: Path, name: str, tokenizer_name: str, family: str) -> Component:
    model_cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    model = _load_checked("text encoder", pipeline / name, lambda: model_cls.from_pretrained(
        pipeline, subfolder=name, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True))
    tokenizer = _tokenizer(pipeline, tokenizer_name)
    module = TextEncoder(model, HIDDEN_OUTPUT[family])
    return Component(name, module, lambda batch, gen: (_token_ids(tokenizer, batch, gen),), module.reference)


def _vae_components(pipeline: Path, resolution: int, downsample: int) -> list[Component]:
    vae = _load_checked("VAE", pipeline / "vae", lambda: AutoencoderKL.from_pretrained(
        pipeline, subfolder="vae", torch_dtype=torch.float32, output_loading_info=True,
        low_cpu_mem_usage=False))
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
    """Trace, save as OUT/<name>.pt, reload, check it pins no device and return the measured max abs error."""
    component.module.eval()
    remove_dropout(component.module)
    inputs = component.make_inputs(TRACE_BATCH, torch.Generator().manual_seed(0))
    path = out / f"{component.name}.pt"
    with quiet_torchscript():
        torch.jit.save(_trace(component.module, inputs), str(path))
        loaded = torch.jit.load(str(path))
    check_device_free([(path.name, loaded)])
    return max_abs_error(loaded, component)


def _text_encoder_entry(pipeline: Path, name: str, tokenizer_name: str, family: str) -> dict:
    config = _read_json(pipeline / name / "config.json")
    tokenizer = _tokenizer(pipeline, tokenizer_name)
    if not _is_int(tokenizer.model_max_length) or not 1 <= tokenizer.model_max_length <= config["max_position_embeddings"]:
        raise _bad(pipeline / tokenizer_name / "tokenizer_config.json", "model_max_length does not fit the text encoder",
                   f"a length in [1, {config['max_position_embeddings']}] ({name}'s max_position_embeddings)",
                   _show(tokenizer.model_max_length))
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
    text_dim = sum(e["hidden_size"] for e in encoders)  # == cross_attention_dim (check_configs)
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

    Raises ExportError for a bad input folder, DeviceConstantError when a written graph pins a device
    (at the first component that does) and ParityError when a parity check fails; none of them
    leaves a manifest.json.
    """
    pipeline = Path(pipeline)
    family = detect_family(pipeline)
    check_configs(pipeline, family)
    downsample = latent_downsample(pipeline)
    if resolution is None:
        resolution = _read_json(pipeline / "unet" / "config.json")["sample_size"] * downsample
        if resolution > MAX_RESOLUTION:
            raise _bad(pipeline / "unet" / "config.json", "sample_size too large",
                       f"sample_size x {downsample} (the VAE's downsampling) at most {MAX_RESOLUTION} pixels",
                       f"{resolution // downsample} ({resolution} pixels)",
                       "Fix sample_size, or pass --resolution to export at a smaller size.")
    if not 0 < resolution <= MAX_RESOLUTION or resolution % downsample:
        raise ExportError(f"--resolution {resolution}: expected a positive multiple of {downsample} "
                          f"up to {MAX_RESOLUTION}; found {resolution}. Pass such a --resolution.")
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
    # The components' identity: a latent cache records the encoders it was made with, and the
    # trainer compares that record with this one (docs/formats.md section 6).
    manifest["sha256"] = {path.name: file_sha256(path) for path in sorted(out.glob("*.pt"))}
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
    except (ParityError, DeviceConstantError) as err:
        print(f"export_models: {err}", file=sys.stderr)
        return 1
    print(f"export_models: {manifest['family']} pipeline {args.pipeline} -> {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
