"""The world's tiny Stable Diffusion 1.5-shaped pipeline and its Pick-a-Pic parquet files.

The pipeline is built like dde_tools.fixtures builds the sd15 fixture: the fixture's tokenizer
and tiny CLIP text encoder (fixtures/source/sd15, frozen, random weights), a fresh tiny UNet of
the fixture's architecture (8 x 8 latents), the DDIM scheduler, and the world's trained VAE.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from dde_tools import fixtures


def make_pipeline(vae: AutoencoderKL, fixture_sd15: Path, out: Path, seed: int) -> Path:
    """Save the world's initial pipeline (random UNet from `seed`) into `out`."""
    tokenizer = CLIPTokenizer.from_pretrained(fixture_sd15 / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(fixture_sd15 / "text_encoder")
    torch.manual_seed(seed)
    unet = fixtures._unet(cross_attention_dim=text_encoder.config.hidden_size)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=fixtures._scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def png(image: Image.Image) -> bytes:
    """Lossless PNG bytes (the trainer and export_pickapic read PNG as well as JPEG)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_row(index: int, caption: str, image_0: bytes, image_1: bytes, label_0: float) -> dict:
    """One Pick-a-Pic v2 row (fixtures.PICKAPIC_SCHEMA) holding a pair of encoded images."""
    uids = [str(uuid.UUID(int=(2 * index + k) + 1)) for k in range(2)]
    return {
        "are_different": True,
        "best_image_uid": uids[0] if label_0 == 1.0 else uids[1] if label_0 == 0.0 else "",
        "caption": caption,
        "created_at": datetime(2023, 4, 1) + timedelta(seconds=index),
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": f"https://images.example/{uids[0]}.png",
        "image_1_uid": uids[1],
        "image_1_url": f"https://images.example/{uids[1]}.png",
        "jpg_0": image_0,
        "jpg_1": image_1,
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": "miniature",
        "model_1": "miniature",
        "ranking_id": index,
        "user_id": 0,
        "num_example_per_prompt": 1,
        "__index_level_0__": index,
    }


def write_parquet(rows: list[dict], path: Path) -> Path:
    """The rows as one Pick-a-Pic parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=fixtures.PICKAPIC_SCHEMA), path, row_group_size=512)
    return path
