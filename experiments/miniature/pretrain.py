"""The v2 base: a text encoder and a UNet pretrained together, in Python with diffusers.

v1's base kept the sd15 fixture's random, frozen CLIP text encoder, and its UNet attended to the
caption only at 4 x 4: it drew what the caption named in 0.189 of the named quadrants. v2 gives the
world its own vocabulary and lets the model learn to read it:
- a CLIP-format BPE tokenizer learned on world captions (dde_tools.fixtures.make_tokenizer), so
  every world word is one or two tokens;
- a fresh CLIP text encoder (64 wide, 2 layers), trained with the UNet;
- a UNet that attends to the caption at every resolution, the SD1.5 block layout (cross-attention
  down, plain down; plain up, cross-attention up), 8 x 8 latents;
- epsilon prediction on the DDPM schedule of SD1.5 (scaled linear, 1000 steps), caption dropout
  for classifier-free guidance, AdamW with a cosine decay, on latents encoded once by the world's
  VAE. Training stops at `steps` (or at `budget_s` seconds, when a cap is set).

The result is a StableDiffusionPipeline folder (with the DDIM scheduler of the fixtures) that
dde_tools.export_models exports for dde_train: only the UNet is trained by preference later.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dde_tools import fixtures
from miniature import vae as vae_io
from miniature import world


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 2700
    # Optional wall-clock cap of the training loop. None (the default since v3.2): the base is a
    # function of the seeds alone. v3 and v3.1 capped it at 1800 s and stopped at 1710 of 2700 steps
    # on a loaded machine, so their base depended on the machine's speed (2700 steps take ~25 min idle).
    budget_s: float | None = None
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    text_width: int = 64
    unet_channels: tuple[int, int] = (64, 128)
    seed: int = 0


def make_world_tokenizer(out_dir: Path, seed: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer learned on 4000 world captions (every world word becomes a token)."""
    captions = world.prompts(seed, 4000)
    return fixtures.make_tokenizer(out_dir, captions, num_merges=120)


def make_text_encoder(tokenizer: CLIPTokenizer, width: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def make_unet(cross_attention_dim: int, channels: tuple[int, int]) -> UNet2DConditionModel:
    """SD1.5's layout in two levels: the caption is attended to at 8 x 8, 4 x 4 and in the middle."""
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16)


def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """[N, 77] ids, padded as the pipelines and dde_train pad them."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means [N, 4, 8, 8] of images [N, 3, 32, 32] in [-1, 1]."""
    means = [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)]
    return torch.cat(means) * vae.config.scaling_factor


def training_data(rows: int, caption_noise: float, exclude: set[str], seed: int) -> tuple[list, list[str]]:
    """`rows` world images and their captions; with probability caption_noise a caption names the
    scene with one attribute changed (imperfect data, as v1). Held-out captions are skipped."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    while len(images) < rows:
        scene = world.sample_scene(rng)
        text = world.caption(scene)
        if text in exclude:
            continue
        if rng.random() < caption_noise:
            text = world.caption(world.corrupt(scene, rng))
            if text in exclude:  # a held-out caption is never seen, not even on the wrong image
                continue
        images.append(world.render(scene))
        captions.append(text)
    return images, captions


def _lr_factor(step: int, s: PretrainSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))))


def pretrain(latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, text_encoder: CLIPTextModel,
             unet: UNet2DConditionModel, s: PretrainSettings, log=print) -> dict:
    """Train text_encoder and unet together on (latents [N, 4, 8, 8], ids [N, 77]); returns a summary."""
    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    alphas_cumprod = fixtures._scheduler().alphas_cumprod.float()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=s.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, s))
    unet.train()
    text_encoder.train()
    start, losses, step = time.perf_counter(), [], 0
    while step < s.steps and (s.budget_s is None or time.perf_counter() - start < s.budget_s):
        pick = torch.randint(0, len(latents), (s.batch,), generator=generator)
        x0, batch_ids = latents[pick], ids[pick].clone()
        drop = torch.rand(s.batch, generator=generator) < s.caption_dropout
        batch_ids[drop] = empty_ids
        t = torch.randint(0, len(alphas_cumprod), (s.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(batch_ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            log(f"pretrain: step {step} loss {np.mean(losses[-200:]):.4f} ({time.perf_counter() - start:.0f} s)")
    unet.eval()
    text_encoder.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-200:])),
            "batch": s.batch, "lr": s.lr, "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters())}


def build_base(vae_dir: Path, out: Path, rows: int, caption_noise: float, exclude: set[str],
               s: PretrainSettings, log=print) -> dict:
    """Tokenizer, text encoder and UNet pretrained on `rows` world images; saved as a pipeline in `out`."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_world_tokenizer(Path(tmp), s.seed)
        tokenizer.save_pretrained(Path(tmp) / "saved")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "saved")
    images, captions = training_data(rows, caption_noise, exclude, s.seed + 4)
    latents = encode_latents(vae, vae_io.to_tensor(images))
    ids = token_ids(tokenizer, captions)
    empty_ids = token_ids(tokenizer, [""])[0]
    torch.manual_seed(s.seed)
    text_encoder = make_text_encoder(tokenizer, s.text_width)
    unet = make_unet(s.text_width, s.unet_channels)
    summary = pretrain(latents, ids, empty_ids, text_encoder, unet, s, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=fixtures._scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return summary | {"rows": rows, "caption_noise": caption_noise}
