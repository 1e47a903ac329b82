"""Tests of dde_tools.fixtures: tokenizer format and parity, pipelines, synthetic Pick-a-Pic, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTokenizer, CLIPTokenizerFast

from dde_tools import fixtures
from dde_tools.common import ToolError

EDGE_CAPTIONS = [
    "",
    "   ",
    "A Red CAT, riding!!  a horse?",
    "zebra 123 élan naïve café",
    "don't stop: it's 3:45 -- ok",
    " ".join(["a giant glowing dragon at sunset, oil painting"] * 12),  # longer than 77 tokens
]


def test_tokenizer_vocabulary_has_clip_layout(fixture_dir: Path) -> None:
    vocab = json.loads((fixture_dir / "sd15" / "tokenizer" / "vocab.json").read_text())
    merges = (fixture_dir / "sd15" / "tokenizer" / "merges.txt").read_text().strip().split("\n")
    assert merges[0].startswith("#version")
    num_merges = len(merges) - 1
    assert 200 <= num_merges <= 400
    by_id = {i: token for token, i in vocab.items()}
    assert sorted(by_id) == list(range(512 + num_merges + 2))
    assert by_id[0] == "!" and by_id[256] == "!</w>" and by_id[511] == by_id[255] + "</w>"
    assert by_id[512] == "".join(merges[1].split())
    assert by_id[len(by_id) - 2] == "<|startoftext|>" and by_id[len(by_id) - 1] == "<|endoftext|>"


@pytest.mark.parametrize("family, folder", [("sd15", "tokenizer"), ("sdxl", "tokenizer"), ("sdxl", "tokenizer_2")])
def test_tokenizer_slow_and_fast_give_identical_ids(fixture_dir: Path, family: str, folder: str) -> None:
    path = fixture_dir / family / folder
    slow, fast = CLIPTokenizer.from_pretrained(path), CLIPTokenizerFast.from_pretrained(path)
    captions = fixtures.make_captions(seed=123, count=300) + EDGE_CAPTIONS
    kwargs = dict(padding="max_length", truncation=True, max_length=77)
    slow_ids, fast_ids = slow(captions, **kwargs).input_ids, fast(captions, **kwargs).input_ids
    assert slow_ids == fast_ids
    merged = sum(len([i for i in ids if 512 <= i < len(slow) - 2]) for ids in slow_ids)
    assert merged > 1000  # the merges are used, not only byte tokens


def test_tokenizer_padding_conventions(fixture_dir: Path) -> None:
    sd15 = CLIPTokenizer.from_pretrained(fixture_dir / "sd15" / "tokenizer")
    tok_1 = CLIPTokenizer.from_pretrained(fixture_dir / "sdxl" / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(fixture_dir / "sdxl" / "tokenizer_2")
    for tokenizer in (sd15, tok_1, tok_2):
        assert tokenizer.model_max_length == 77
        assert tokenizer.bos_token_id == len(tokenizer) - 2 and tokenizer.eos_token_id == len(tokenizer) - 1
    assert sd15.pad_token_id == sd15.eos_token_id and tok_1.pad_token_id == tok_1.eos_token_id
    assert tok_2.pad_token == "!" and tok_2.pad_token_id == 0
    ids = tok_2("a red cat", padding="max_length", max_length=77).input_ids
    eos = ids.index(tok_2.eos_token_id)
    assert ids[0] == tok_2.bos_token_id and ids[eos + 1 :] == [0] * (76 - eos)
    long = sd15(EDGE_CAPTIONS[-1], padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == sd15.eos_token_id


def test_sd15_pipeline_loads_and_runs(fixture_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(fixture_dir / "sd15")
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.cross_attention_dim == 32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.max_position_embeddings == 77
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.num_train_timesteps, sched.prediction_type) == (1000, "epsilon")
    assert sched.set_alpha_to_one is False and sched.steps_offset == 1
    image = pipe("a red cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000  # fast enough for CPU tests


def test_sdxl_pipeline_loads_and_runs(fixture_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(fixture_dir / "sdxl")
    unet = pipe.unet.config
    assert pipe.vae.config.scaling_factor == 0.13025
    assert unet.addition_embed_type == "text_time" and unet.addition_time_embed_dim == 8
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 8
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    image = pipe("a red cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_pipelines_are_deterministic(tmp_path: Path, fixture_dir: Path) -> None:
    fixtures.make_sd15_pipeline(tmp_path / "again", seed=0)
    fixtures.make_sd15_pipeline(tmp_path / "other", seed=1)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tmp_path / "again" / part).read_bytes() == (fixture_dir / "sd15" / part).read_bytes(), part
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "other" / unet).read_bytes() != (fixture_dir / "sd15" / unet).read_bytes()


def test_pickapic_parquet_is_deterministic(tmp_path: Path) -> None:
    first = fixtures.make_pickapic_parquet(tmp_path / "a.parquet", rows=300, seed=4, bad_rows=True)
    second = fixtures.make_pickapic_parquet(tmp_path / "b.parquet", rows=300, seed=4, bad_rows=True)
    fixtures.make_pickapic_parquet(tmp_path / "c.parquet", rows=300, seed=5, bad_rows=True)
    assert first == second
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


def test_pickapic_parquet_schema_and_content(bad_parquet: tuple[Path, dict[str, int]]) -> None:
    path, planted = bad_parquet
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow == fixtures.PICKAPIC_SCHEMA
    assert parquet.metadata.num_rows == 2000 and parquet.metadata.num_row_groups == 8  # 256 rows each
    assert planted == {"rows": 2000, "ties": 200, "preferred": 0, "missing_image": 10, "undecodable_image": 10,
                       "empty_caption": 10, "bad_label": 10}
    table = parquet.read(columns=["jpg_0", "label_0", "label_1", "caption"]).to_pylist()
    assert sum(r["label_0"] == 0.5 and r["label_1"] == 0.5 for r in table) == 200
    assert sum(r["label_0"] not in (0.0, 0.5, 1.0) or r["label_1"] != 1 - r["label_0"] for r in table) == 10
    sizes = set()
    for row in table[:100]:
        if row["jpg_0"]:
            with Image.open(io.BytesIO(row["jpg_0"])) as image:
                sizes.add(image.size)
                assert image.format == "JPEG"
    assert all(64 <= side <= 128 for size in sizes for side in size)
    assert sum(w != h for w, h in sizes) > 50
    assert len({r["caption"] for r in table}) > 1000


def test_build_all_is_idempotent_per_seed(tmp_path: Path) -> None:
    calls = []

    def build(target: Path) -> None:
        calls.append(target)
        (target / "data").write_text("x")

    assert fixtures._build_once(tmp_path / "part", 0, build) is True
    assert fixtures._build_once(tmp_path / "part", 0, build) is False
    assert fixtures._build_once(tmp_path / "part", 1, build) is True
    assert len(calls) == 2 and (tmp_path / "part" / "data").is_file()


def test_cli_skips_existing_fixtures(fixture_dir: Path, run_cli) -> None:
    before = {p: p.stat().st_mtime_ns for p in fixture_dir.rglob("*") if p.is_file()}
    proc = run_cli("fixtures", "--out", str(fixture_dir), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("up to date") == 4
    assert {p: p.stat().st_mtime_ns for p in fixture_dir.rglob("*") if p.is_file()} == before
    assert pq.ParquetFile(fixture_dir / "pickapic" / "train-00000.parquet").metadata.num_rows == 128
    assert pq.ParquetFile(fixture_dir / "pickapic_eval" / "eval-00000.parquet").metadata.num_rows == 48


def _mean_brightness(jpeg: bytes) -> float:
    with Image.open(io.BytesIO(jpeg)) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).mean())


def test_planted_preference_makes_winners_brighter(tmp_path: Path) -> None:
    """The tiny default's learnable preference: preferred rows have a brightened winner and a
    darkened loser; the other labelled rows are unmodified draws with random labels."""
    planted = fixtures.make_pickapic_parquet(tmp_path / "p.parquet", rows=200, seed=2, preference=0.8)
    plain = fixtures.make_pickapic_parquet(tmp_path / "q.parquet", rows=200, seed=2)
    assert planted["ties"] == 20 and 130 <= planted["preferred"] <= 158  # 0.8 of 180, drawn
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    same = pq.read_table(tmp_path / "q.parquet").to_pylist()
    gaps, unplanted = [], []
    for row, twin in zip(rows, same):
        assert (row["caption"], row["label_0"]) == (twin["caption"], twin["label_0"])  # same draws
        if row["label_0"] == 0.5:
            continue
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        gap = _mean_brightness(row[winner]) - _mean_brightness(row[loser])
        (gaps if row["jpg_0"] != twin["jpg_0"] else unplanted).append(gap)
    assert len(gaps) == planted["preferred"] and len(unplanted) == 180 - planted["preferred"]
    assert min(gaps) > 0 and np.mean(gaps) > 60
    assert abs(np.mean(unplanted)) < 25  # random labels: no systematic gap


def test_a_part_fixtures_did_not_write_is_never_removed(tmp_path: Path, capsys) -> None:
    part = tmp_path / "sd15"
    part.mkdir()
    (part / "mine.txt").write_text("keep me")
    with pytest.raises(ToolError, match="a folder fixtures did not write"):
        fixtures._build_once(part, 0, lambda target: None)
    assert fixtures.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"fixtures: error: {part}: a folder fixtures did not write" in err and "mine.txt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd15"] and (part / "mine.txt").read_text() == "keep me"
    (part / fixtures.STAMP_FILE).write_text("{not json")
    with pytest.raises(ToolError, match="no readable dde_fixture.json"):
        fixtures._build_once(part, 0, lambda target: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fixtures._build_once(empty, 0, lambda target: (target / "data").write_text("x")) is True


def test_bad_options_exit_2(tmp_path: Path, capsys) -> None:
    assert fixtures.main(["--out", str(tmp_path), "--seed", "-1"]) == 2
    assert "fixtures: error: --seed: out of range" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert fixtures.main(["--out", str(tmp_path / "file" / "sub")]) == 2
    assert "a part of the path is a file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]
