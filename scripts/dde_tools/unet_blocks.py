"""The diffusers UNet2DConditionModel cut into separately traceable units (docs/formats.md §1).

The C++ trainer runs these units in diffusers' order and, with gradient checkpointing, recomputes
each one in backward; a single traced graph cannot be checkpointed from C++ (libtorch-notes.md).
The cut is at the granularity of diffusers' own `enable_gradient_checkpointing()`: one unit per
resnet (with its transformer, where the block has one), per down/upsampler, the mid block, and
the input and output heads. It mirrors `UNet2DConditionModel.forward` and the down/up blocks'
forwards (diffusers 0.37):

    input            (sample, timestep[, text_embeds, time_ids]) -> (h, emb)   pushes h
    down_blocks.i.j  (h, emb, encoder_hidden_states) -> h                     resnet j (+ attention j); pushes h
    ...downsample    (h, emb, encoder_hidden_states) -> h                     pushes h
    mid_block        (h, emb, encoder_hidden_states) -> h
    up_blocks.i.j    (h, emb, encoder_hidden_states, skip) -> h               pops 1: cat([h, skip]), resnet j (+ attention j)
    ...upsample      (h, emb, encoder_hidden_states, size_like) -> h          upsamples to size_like's size
    output           (h) -> eps                                               conv_norm_out, conv_act, conv_out

The skip stack holds what the input and down units pushed; each up unit pops the newest. An
upsampler takes the next skip on the stack as `size_like`: diffusers passes that size only when
the latent is not a multiple of 2**num_upsamplers, and for nearest-neighbour upsampling an
explicit doubled size equals the scale factor 2, so always passing it is exact and handles odd
sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

SUPPORTED_ADDITION = (None, "text_time")


class UnsupportedUNet(Exception):
    """The UNet config uses a feature the block export does not mirror."""


def check_supported(unet: UNet2DConditionModel) -> None:
    """Refuse configs whose forward has branches the blocks below do not reproduce."""
    cfg = unet.config
    problems = []
    if cfg.center_input_sample:
        problems.append("center_input_sample=True")
    if unet.class_embedding is not None:
        problems.append(f"class_embed_type={cfg.class_embed_type!r}")
    if cfg.addition_embed_type not in SUPPORTED_ADDITION:
        problems.append(f"addition_embed_type={cfg.addition_embed_type!r}")
    if type(unet.time_proj).__name__ != "Timesteps":
        problems.append(f"time_embedding_type={cfg.time_embedding_type!r}")
    if cfg.addition_embed_type == "text_time" and type(unet.add_time_proj).__name__ != "Timesteps":
        problems.append(f"add_time_proj is a {type(unet.add_time_proj).__name__}")
    if unet.encoder_hid_proj is not None:
        problems.append(f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    if unet.mid_block is None:
        problems.append("no mid block")
    for where, blocks, known in (("down_blocks", unet.down_blocks, ("DownBlock2D", "CrossAttnDownBlock2D")),
                                 ("up_blocks", unet.up_blocks, ("UpBlock2D", "CrossAttnUpBlock2D"))):
        for i, block in enumerate(blocks):
            if type(block).__name__ not in known:
                problems.append(f"{where}.{i} is a {type(block).__name__}")
            if getattr(block, "s1", None):
                problems.append(f"{where}.{i} has FreeU enabled")
    if problems:
        raise UnsupportedUNet("unsupported UNet config for the block export: " + ", ".join(problems))


class SinusoidalTimesteps(nn.Module):
    """diffusers' `Timesteps` (get_timestep_embedding, max_period 10000) without device constants.

    diffusers builds the frequency vector with `torch.arange(..., device=timesteps.device)` on
    every call; traced, that device becomes a `prim::Constant` and the graph then mixes a CPU
    tensor into a CUDA forward. Here the arange is an int64 buffer made at export time (it moves
    with the module, and the C++ loader's bf16 cast of frozen models leaves integer buffers alone),
    and the frequencies are computed from it with diffusers' float32 ops in diffusers' order:
    exp(-ln(max_period) * i / (half - shift)). The int64 -> float32 conversions come from type
    promotion (int64 tensor times a float), which converts exactly as `.float()` does without a
    dtype constant in the graph; float timesteps (SDXL's time ids) are used as they come.
    """

    MAX_PERIOD = 10000

    def __init__(self, timesteps: nn.Module) -> None:
        super().__init__()
        self.num_channels = int(timesteps.num_channels)
        self.flip_sin_to_cos = bool(timesteps.flip_sin_to_cos)
        self.downscale_freq_shift = float(timesteps.downscale_freq_shift)
        self.scale = timesteps.scale
        self.half = self.num_channels // 2
        self.register_buffer("steps", torch.arange(self.half, dtype=torch.int64), persistent=False)

    def forward(self, timesteps: Tensor) -> Tensor:
        exponent = self.steps * -math.log(self.MAX_PERIOD)
        freqs = torch.exp(exponent / (self.half - self.downscale_freq_shift))
        args = self.scale * (timesteps[:, None] * freqs[None, :])
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, self.half :], emb[:, : self.half]], dim=-1)
        if self.num_channels % 2:
            emb = nn.functional.pad(emb, (0, 1, 0, 0))
        return emb


class InputBlock(nn.Module):
    """forward(sample, timestep[, text_embeds, time_ids]) -> (h, emb); parameter names as diffusers'.

    Mirrors UNet2DConditionModel.get_time_embed, get_aug_embed ("text_time") and the start of
    forward for a 1-D timestep tensor; the sinusoidal projections are SinusoidalTimesteps, and
    diffusers' `.to(sample.dtype)` / `.to(emb.dtype)` are `type_as`, which the tracer records as
    an op on the tensor instead of fixing the dtype of the example input as a constant.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.conv_in = unet.conv_in
        self.time_proj = SinusoidalTimesteps(unet.time_proj)
        self.time_embedding = unet.time_embedding
        self.sdxl = unet.config.addition_embed_type == "text_time"
        self.add_time_proj = SinusoidalTimesteps(unet.add_time_proj) if self.sdxl else None
        self.add_embedding = unet.add_embedding if self.sdxl else None
        self.time_embed_act = getattr(unet, "time_embed_act", None)

    def forward(self, sample: Tensor, timestep: Tensor, *added: Tensor) -> tuple[Tensor, Tensor]:
        t_emb = self.time_proj(timestep.expand(sample.shape[0])).type_as(sample)
        emb = self.time_embedding(t_emb, None)
        if self.sdxl:
            text_embeds, time_ids = added
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).type_as(emb)
            emb = emb + self.add_embedding(add_embeds)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return self.conv_in(sample), emb


class DownStage(nn.Module):
    """forward(h, emb, encoder_hidden_states) -> h: one resnet and its attention (CrossAttnDownBlock2D's loop body)."""

    def __init__(self, resnet: nn.Module, attn: nn.Module | None) -> None:
        super().__init__()
        self.resnet = resnet
        self.attn = attn

    def forward(self, h: Tensor, emb: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        h = self.resnet(h, emb)
        if self.attn is not None:
            h = self.attn(h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return h


class UpStage(DownStage):
    """forward(h, emb, encoder_hidden_states, skip) -> h: CrossAttnUpBlock2D's loop body."""

    def forward(self, h: Tensor, emb: Tensor, encoder_hidden_states: Tensor, skip: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cat([h, skip], dim=1), emb, encoder_hidden_states)


class Downsample(nn.Module):
    """forward(h, emb, encoder_hidden_states) -> h: a down block's downsamplers."""

    def __init__(self, samplers: nn.ModuleList) -> None:
        super().__init__()
        self.samplers = samplers

    def forward(self, h: Tensor, emb: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        for sampler in self.samplers:
            h = sampler(h)
        return h


class Upsample(Downsample):
    """forward(h, emb, encoder_hidden_states, size_like) -> h: an up block's upsamplers, to size_like's size."""

    def forward(self, h: Tensor, emb: Tensor, encoder_hidden_states: Tensor, size_like: Tensor) -> Tensor:  # type: ignore[override]
        # Upsample2D makes its input contiguous for batches >= 64 and outputs >= 2**31 elements
        # (a workaround for upsample_nearest_nhwc); traced at batch 2 those branches are fixed to
        # "no". A contiguous input makes them no-ops at every size (contiguous() of a contiguous
        # tensor is the tensor itself).
        h = h.contiguous()
        for sampler in self.samplers:
            h = sampler(h, size_like.shape[2:])
        return h


class MidBlock(nn.Module):
    """forward(h, emb, encoder_hidden_states) -> h; parameters `block.*` = `mid_block.*`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.cross = getattr(block, "has_cross_attention", False)

    def forward(self, h: Tensor, emb: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        if self.cross:
            return self.block(h, emb, encoder_hidden_states=encoder_hidden_states)
        return self.block(h, emb)


class OutputBlock(nn.Module):
    """forward(h) -> eps; parameter names as diffusers'."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    def forward(self, h: Tensor) -> Tensor:
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)


@dataclass
class Block:
    """One exported unit: its manifest entry and the module to trace."""

    name: str  # file stem and manifest name, e.g. "down_blocks.1.0"
    kind: str  # input | down | mid | up | output
    module: nn.Module | None
    params: list[tuple[str, str]]  # (traced-name prefix, diffusers prefix) rules
    pops: int = 0  # skips popped from the stack (passed after encoder_hidden_states)
    push_output: bool = False  # the unit's output h is pushed as a skip
    takes_size: bool = False  # also takes the next skip on the stack as size_like

    def entry(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "file": f"unet/{self.name}.pt",
            "params": [{"prefix": p, "diffusers": d} for p, d in self.params],
            "pops": self.pops,
            "push_output": self.push_output,
            "takes_size": self.takes_size,
        }

    def diffusers_name(self, traced_name: str) -> str:
        for prefix, diffusers in self.params:
            if traced_name.startswith(prefix):
                return diffusers + traced_name[len(prefix) :]
        raise KeyError(f"{self.name}: parameter {traced_name} matches no prefix rule")


def _stages(block: nn.Module, where: str, kind: str) -> list[Block]:
    attentions = getattr(block, "attentions", None)
    units = []
    for j, resnet in enumerate(block.resnets):
        attn = attentions[j] if attentions is not None else None
        rules = [("resnet.", f"{where}.resnets.{j}."), ("attn.", f"{where}.attentions.{j}.")]
        if kind == "down":
            units.append(Block(f"{where}.{j}", "down", DownStage(resnet, attn), rules, push_output=True))
        else:
            units.append(Block(f"{where}.{j}", "up", UpStage(resnet, attn), rules, pops=1))
    return units


def split_unet(unet: UNet2DConditionModel) -> list[Block]:
    """The units of `unet` in execution order (they share the unet's parameters)."""
    check_supported(unet)
    blocks = [Block("input", "input", InputBlock(unet), [("", "")], push_output=True)]
    for i, block in enumerate(unet.down_blocks):
        blocks += _stages(block, f"down_blocks.{i}", "down")
        if block.downsamplers is not None:
            rules = [("samplers.", f"down_blocks.{i}.downsamplers.")]
            blocks.append(Block(f"down_blocks.{i}.downsample", "down", Downsample(block.downsamplers), rules, push_output=True))
    blocks.append(Block("mid_block", "mid", MidBlock(unet.mid_block), [("block.", "mid_block.")]))
    for i, block in enumerate(unet.up_blocks):
        blocks += _stages(block, f"up_blocks.{i}", "up")
        if block.upsamplers is not None:
            rules = [("samplers.", f"up_blocks.{i}.upsamplers.")]
            blocks.append(Block(f"up_blocks.{i}.upsample", "up", Upsample(block.upsamplers), rules, takes_size=True))
    blocks.append(Block("output", "output", OutputBlock(unet), [("", "")]))
    return blocks


def run_blocks(blocks: list[tuple[Block, nn.Module]], sample: Tensor, timestep: Tensor, ehs: Tensor, *added: Tensor) -> Tensor:
    """Compose (Block, callable) pairs as the C++ UNet does: the Python mirror of src/models/unet.cpp."""
    stack: list[Tensor] = []
    h = emb = None
    for block, fn in blocks:
        if block.kind == "input":
            h, emb = fn(sample, timestep, *added)
        elif block.kind == "output":
            h = fn(h)
        else:
            popped = [stack.pop() for _ in range(block.pops)][::-1]
            h = fn(h, emb, ehs, *popped, *([stack[-1]] if block.takes_size else []))
        if block.push_output:
            stack.append(h)
    assert not stack, f"{len(stack)} skips left unused"
    return h


def block_inputs(blocks: list[Block], sample: Tensor, timestep: Tensor, ehs: Tensor, *added: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Each unit's example inputs, recorded from one eager pass (what each unit is traced with)."""
    recorded: dict[str, tuple[Tensor, ...]] = {}

    def recorder(block: Block):
        def call(*args: Tensor):
            recorded[block.name] = tuple(a.detach() for a in args)
            return block.module(*args)

        return call

    with torch.no_grad():
        run_blocks([(b, recorder(b)) for b in blocks], sample, timestep, ehs, *added)
    return recorded
