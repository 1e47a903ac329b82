"""A small AutoencoderKL for the world (32 px -> 8 x 8 x 4 latents), trained from scratch on CPU.

Loss: per-pixel MSE of the reconstruction from a posterior sample + KL_WEIGHT x KL, AdamW.
The scaling factor is set afterwards to 1 / std of the latent means, as Stable Diffusion's
0.18215 was chosen, so the diffusion model sees latents of unit spread.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from miniature.world import SIZE

KL_WEIGHT = 1e-6


def make_vae() -> AutoencoderKL:
    """Three encoder levels: a downsample of 4, so 32 px images have 8 x 8 latents."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=SIZE,
    )


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """Inverse of to_tensor, clamped and rounded."""
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def train_vae(images: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 2e-3) -> AutoencoderKL:
    """Train make_vae() on `images` [N, 3, H, W]; cosine learning-rate decay; logs every 100 steps."""
    torch.manual_seed(seed)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae: step {step} mse {loss.item():.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Decode of the posterior mean, in batches."""
    return torch.cat([vae.decode(vae.encode(images[i : i + 256]).latent_dist.mean).sample
                      for i in range(0, len(images), 256)])
