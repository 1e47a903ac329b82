"""Deterministic test fixtures: a tiny CLIP tokenizer, tiny SD1.5/SDXL pipelines, a synthetic Pick-a-Pic.

Everything is built from random weights and a seed; nothing is downloaded.

Synthetic Pick-a-Pic v2 parquet schema (the Arrow types of the Hugging Face parquet files,
as listed in the dataset card of yuvalkirstain/pickapic_v1, which v2 shares):

    are_different: bool            best_image_uid: string        caption: string
    created_at: timestamp[ns]      has_label: bool               image_0_uid: string
    image_0_url: string            image_1_uid: string           image_1_url: string
    jpg_0: binary                  jpg_1: binary                 label_0: double (float64)
    label_1: double (float64)      model_0: string               model_1: string
    ranking_id: int64              user_id: int64                num_example_per_prompt: int64
    __index_level_0__: int64

The tiny default's Pick-a-Pic carries a preference a tiny model can learn (see
make_pickapic_parquet's `preference`): in most labelled pairs the winner is a brightened and the
loser a darkened rendering; the other pairs keep random labels between unmodified images.

CLI: python -m dde_tools.fixtures --out DIR [--seed N]
writes DIR/sd15/, DIR/sdxl/ (diffusers pipelines), DIR/pickapic/train-00000.parquet and the
held-out DIR/pickapic_eval/eval-00000.parquet, skipping any part whose stamp file records the
same seed and fixture version. A part is rebuilt (removed first) only when it holds a stamp of
this tool, or nothing: a folder of that name holding anything else is refused (exit 2).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dde_tools import hostile_rows as hostile
from dde_tools.clip_vocab import EOS, save_clip_tokenizer
from dde_tools.common import ToolError, check_output, run_main

FIXTURE_VERSION = 3
STAMP_FILE = "dde_fixture.json"
# CLIPTokenizer's pre-tokenizer pattern without the special tokens.
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
RESOLUTION = 64  # pixels; 8x8 latents

ADJECTIVES = (
    "red blue green yellow purple orange golden silver ancient futuristic tiny giant glowing "
    "misty snowy rusty wooden crystal neon cozy dramatic serene stormy vintage cyberpunk "
    "whimsical majestic dark bright colorful abandoned floating underwater enchanted"
).split()
NOUNS = (
    "cat dog fox owl dragon robot astronaut knight wizard castle village city forest mountain "
    "river ocean lighthouse spaceship train bicycle garden library kitchen temple bridge tower "
    "portrait landscape flower mushroom butterfly whale tiger horse samurai princess monster "
    "skyline desert volcano waterfall cottage cathedral market harbor"
).split()
PLACES = (
    "in the rain|at sunset|under the stars|on the moon|in a dream|at night|in winter|"
    "by the sea|in the clouds|inside a bottle|on mars|in tokyo|in paris"
).split("|")
STYLES = (
    "oil painting|watercolor|digital art|3d render|pixel art|studio photograph|concept art|"
    "pencil sketch|anime style|trending on artstation|highly detailed|8k|unreal engine|"
    "by greg rutkowski|cinematic lighting|octane render|low poly|ukiyo-e woodblock print"
).split("|")
MODELS = ("SDXL 0.9", "SDXL Beta", "Stable Diffusion 2.1", "Dreamlike Photoreal 2.0")


def make_captions(seed: int, count: int) -> list[str]:
    """Synthetic prompts in the style of Pick-a-Pic captions."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = [rng.choice(("a", "an", "the", "two", "3")), rng.choice(ADJECTIVES)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words += [rng.choice(NOUNS), rng.choice(PLACES)]
        text = " ".join(words)
        for _ in range(rng.randint(0, 3)):
            text += ", " + rng.choice(STYLES)
        captions.append(text.capitalize() if rng.random() < 0.3 else text)
    return captions


def _learn_merges(captions: list[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE merges learned with the `tokenizers` trainer on CLIP's normalisation and pre-tokenisation."""
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return pairs[:num_merges]


def make_tokenizer(
    out_dir: Path, captions: list[str], pad_token: str = EOS, num_merges: int = 400
) -> CLIPTokenizer:
    """Write a CLIP-format byte-level BPE tokenizer learned on `captions` into `out_dir`
    (CLIP's vocabulary order: clip_vocab.save_clip_tokenizer)."""
    return save_clip_tokenizer(out_dir, _learn_merges(captions, num_merges), pad_token)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    """A random VAE whose posterior is narrow, as a trained one's is: with random weights the
    log-variance is ~0 and the sampling noise would drown the winner/loser difference, so no
    preference could be learned on the fixture (the quick start's curves would be noise)."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
    )
    with torch.no_grad():
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:].zero_()
        vae.quant_conv.bias[latent:].fill_(-12.0)  # logvar = -12: std 2.5e-3
    return vae


def _text_config(tokenizer: CLIPTokenizer, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        **extra,
    )


def make_sd15_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random-weight StableDiffusionPipeline (64 px, 8x8 latents) into `out_dir`."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp), make_captions(seed, 2000))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = _unet(cross_attention_dim=32)
    vae = _vae(scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_sdxl_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random-weight StableDiffusionXLPipeline (64 px, 8x8 latents) into `out_dir`."""
    out_dir = Path(out_dir)
    captions = make_captions(seed, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp, "1"), captions)
        tokenizer_2 = make_tokenizer(Path(tmp, "2"), captions, pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    time_embed_dim = 8
    unet = _unet(
        cross_attention_dim=32 + 32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
    )
    vae = _vae(scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def draw_image(rng: np.random.Generator) -> Image.Image:
    """A procedurally drawn image: a colour gradient with a few shapes, 64-128 px per side."""
    width, height = (int(v) for v in rng.integers(64, 129, size=2))
    start, end = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    pixels = start + (end - start) * ramp
    image = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def draw_jpeg(rng: np.random.Generator) -> bytes:
    """A procedurally drawn JPEG (draw_image)."""
    return to_jpeg(draw_image(rng))


def to_jpeg(image: Image.Image, brightness: float = 0.0) -> bytes:
    """JPEG bytes of `image`; brightness in (-1, 1): > 0 moves every pixel that fraction of the
    way to white, < 0 to black."""
    if brightness != 0.0:
        pixels = np.asarray(image, dtype=np.float64)
        target = 255.0 if brightness > 0 else 0.0
        image = Image.fromarray(np.rint(pixels + (target - pixels) * abs(brightness)).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)
REJECTION_KINDS = ("missing_image", "undecodable_image", "empty_caption", "bad_label")


def _plant_bad_row(row: dict, kind: str, variant: int) -> None:
    """Break `row` in the way `kind` names; `variant` picks one of several forms."""
    side = f"jpg_{variant % 2}"
    if kind == "missing_image":
        row[side] = None if variant % 4 < 2 else b""
    elif kind == "undecodable_image":
        good = row[side]
        row[side] = good[: len(good) // 2] if variant % 4 < 2 else b"\xff\xd8\xff\xe0 not a jpeg"
    elif kind == "empty_caption":
        row["caption"] = (None, "", "   \t")[variant % 3]
    elif kind == "bad_label":
        row["label_0"], row["label_1"] = ((0.3, 0.7), (None, 1.0), (1.0, 1.0), (2.0, -1.0))[variant % 4]


def _pickapic_row(index: int, caption: str, rng: np.random.Generator, start: datetime,
                  planted: float = 0.0) -> dict:
    """One labelled row; with planted > 0 both images are renderings of image 0's drawing, the
    winner brightened and the loser darkened by `planted` (the random draws stay the same)."""
    uids = [str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "little"))) for _ in range(2)]
    label_0 = float(rng.integers(0, 2))
    created_at = start + timedelta(seconds=int(rng.integers(0, 10_000_000)))
    images = [draw_image(rng), draw_image(rng)]
    shift_0 = planted if label_0 == 1.0 else -planted
    if planted:
        images[1] = images[0]
    return {
        "are_different": True,
        "best_image_uid": uids[0] if label_0 == 1.0 else uids[1],
        "caption": caption,
        "created_at": created_at,
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": f"https://images.example/{uids[0]}.png",
        "image_1_uid": uids[1],
        "image_1_url": f"https://images.example/{uids[1]}.png",
        "jpg_0": to_jpeg(images[0], shift_0),
        "jpg_1": to_jpeg(images[1], -shift_0),
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": MODELS[int(rng.integers(0, len(MODELS)))],
        "model_1": MODELS[int(rng.integers(0, len(MODELS)))],
        "ranking_id": 100_000 + index,
        "user_id": int(rng.integers(1, 50)),
        "num_example_per_prompt": int(rng.integers(1, 4)),
        "__index_level_0__": index,
    }


def _table(rows: list[dict]) -> pa.Table:
    """The rows as a table; a text field holding bytes (a hostile row) is written unvalidated."""
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if not isinstance(v, bytes) or k.startswith("jpg")}
                                  for r in rows], schema=PICKAPIC_SCHEMA)
    for name in ("caption", "image_0_uid", "image_1_uid"):
        if any(isinstance(r.get(name), bytes) for r in rows):
            raw = [v if isinstance(v, bytes) or v is None else v.encode("utf-8") for v in (r[name] for r in rows)]
            column = pa.array(raw, pa.binary()).view(pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def make_pickapic_parquet(
    path: Path,
    rows: int = 2000,
    seed: int = 0,
    tie_fraction: float = 0.1,
    bad_rows: bool = False,
    row_group_size: int = 256,
    hostile_rows: bool = False,
    preference: float = 0.0,
    brighten: float = 0.4,
) -> dict[str, int]:
    """Write a synthetic Pick-a-Pic v2 parquet file; return what was planted.

    About `tie_fraction` of rows are ties (labels 0.5/0.5); the rest are 0/1 or 1/0. With
    `bad_rows`, max(1, rows // 200) rows of each kind in REJECTION_KINDS are planted, with
    `hostile_rows` as many of each kind in hostile_rows.KINDS (never on a tie). A `preference`
    fraction of the labelled rows carries a learnable preference: their winner is drawn
    `brighten` of the way to white and their loser as far to black; the other rows keep random
    labels between unmodified images (with preference 0, the default, every row is such). The
    result maps "rows", "ties", "preferred" (rows with the planted preference) and each kind to
    its count.
    """
    rng = np.random.default_rng(seed)
    preference_rng = np.random.default_rng([seed, 1])  # its own stream: the rows' draws stay put
    captions = make_captions(seed + 1, rows)
    order = rng.permutation(rows)
    num_ties = round(rows * tie_fraction)
    ties = set(order[:num_ties].tolist())
    kinds = (REJECTION_KINDS if bad_rows else ()) + (hostile.KINDS if hostile_rows else ())
    per_kind = max(1, rows // 200) if kinds else 0
    if num_ties + per_kind * len(kinds) > rows:
        raise ValueError(f"{rows} rows cannot hold {num_ties} ties and {per_kind} bad rows of each kind")
    planted = {}
    for k, kind in enumerate(kinds):
        first = num_ties + k * per_kind
        planted.update({int(i): (kind, v) for v, i in enumerate(order[first : first + per_kind])})
    counts = dict.fromkeys(REJECTION_KINDS + (hostile.KINDS if hostile_rows else ()), 0)

    preferred = {i for i in range(rows) if i not in ties and preference_rng.random() < preference}
    start = datetime(2023, 4, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = None  # the latest row that is neither a tie nor planted: what a duplicate repeats
    with pq.ParquetWriter(path, PICKAPIC_SCHEMA) as writer:
        for group_start in range(0, rows, row_group_size):
            batch = []
            for index in range(group_start, min(rows, group_start + row_group_size)):
                row = _pickapic_row(index, captions[index], rng, start,
                                    brighten if index in preferred else 0.0)
                if index in ties:
                    row.update(label_0=0.5, label_1=0.5, best_image_uid="")
                kind, variant = planted.get(index, (None, 0))
                if kind in REJECTION_KINDS:
                    _plant_bad_row(row, kind, variant)
                    counts[kind] += 1
                elif kind is not None:
                    counts[kind] += hostile.plant(row, kind, variant, clean)
                elif index not in ties:
                    clean = row
                batch.append(row)
            writer.write_table(_table(batch))
    return {"rows": rows, "ties": num_ties, "preferred": len(preferred), **counts}


def _build_once(target: Path, seed: int, build: Callable[[Path], object]) -> bool:
    """Run `build(target)` unless `target` holds a stamp for this seed; return whether it built."""
    stamp = {"seed": seed, "fixture_version": FIXTURE_VERSION}
    stamp_path = target / STAMP_FILE
    try:
        found = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    except (OSError, ValueError):
        found = "unreadable"
    if found == stamp:
        return False
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ToolError(target, "not a fixture folder", "a folder written by dde_tools.fixtures, or nothing",
                        "a link or a file", "Move it away or pass another --out.")
    if target.exists() and any(target.iterdir()) and not (isinstance(found, dict) and "fixture_version" in found):
        raise ToolError(target, "a folder fixtures did not write", f"a folder holding {STAMP_FILE}, or nothing",
                        f"{sorted(p.name for p in target.iterdir())[:3]} and no readable {STAMP_FILE}",
                        "Move it away or pass another --out: fixtures only replaces its own parts.")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    build(target)
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return True


def build_all(out: Path, seed: int = 0) -> None:
    """Write out/sd15, out/sdxl, out/pickapic/train-00000.parquet (128 rows) and the held-out
    out/pickapic_eval/eval-00000.parquet (48 rows): 10 % ties, 80 % of the rest with the planted
    brightness preference, the others random labels."""
    parts = {
        "sd15": lambda d: make_sd15_pipeline(d, seed),
        "sdxl": lambda d: make_sdxl_pipeline(d, seed),
        "pickapic": lambda d: make_pickapic_parquet(d / "train-00000.parquet", rows=128, seed=seed,
                                                    preference=0.8),
        "pickapic_eval": lambda d: make_pickapic_parquet(d / "eval-00000.parquet", rows=48,
                                                         seed=seed + 1000, preference=0.8),
    }
    for name, build in parts.items():
        built = _build_once(Path(out) / name, seed, build)
        print(f"fixtures: {name}: {'built' if built else 'up to date'} ({Path(out) / name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.seed < 0:
            raise ToolError("--seed", "out of range", "an integer >= 0", str(args.seed), "Pass a non-negative seed.")
        check_output("fixtures", args.out, own_patterns=("*",), legacy=lambda _folder: True)  # links, files
        build_all(args.out, args.seed)
        return 0

    return run_main("fixtures", body)


if __name__ == "__main__":
    raise SystemExit(main())
