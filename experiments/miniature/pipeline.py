"""The world's images and pairs as Pick-a-Pic parquet files (dde_tools.export_pickapic reads them).

The base pipeline itself is built by miniature.pretrain.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dde_tools import fixtures


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


def load_pipeline(folder: Path):
    """A saved miniature pipeline (the base, or a preference run exported by export_diffusers)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
