"""Held-out preference accuracy (config data.eval_index, src/train/evaluator.cpp) on the tiny SD1.5
fixture: the real dde_train binary evaluates at the configured steps only, starts from Delta = 0 and
loss log 2 (policy = reference), and its figures equal an independent recomputation with diffusers
from the checkpoint's weights (on one rank and on two), through a resume too.

The recomputation reads the held-out shards with tarfile, preprocesses with Pillow (resize of the
shorter side, center crop), encodes with the diffusers AutoencoderKL and CLIPTextModel of the source
pipeline, and runs the diffusers UNet2DConditionModel of the checkpoint (policy) and of the source
pipeline (reference), with noise drawn from torch.Generator seeded as docs/formats.md states.

The runs evaluate PNG copies of the held-out shards (the same pixels Pillow decodes from the JPEGs),
so both sides start from identical pixels (the C++ resize is Pillow's, to the bit) and differ only by
float32 rounding in the models. The recomputation runs twice, in float32 and in float64: per t bin,
the float32 noise floor is the largest per-pair |Delta_32 - Delta_64|, and the trainer's mean Delta
must lie within 8 floors of the float64 value (the loss and the accuracy within what that allows):
a bound that scales with each bin (Delta at t = 900 is 10-30x smaller than at t = 50) and with the
CPU's kernels, and that a wrong noise draw, pair or weight exceeds by orders of magnitude.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from conftest import default_dtype, read_metrics, read_records, rewrite_shards, run_train, tiny_overrides
from dde_reference import schedule
from test_multiprocess import finish, launch

STEPS, EVERY = 4, 3
T_BINS = [50, 400, 900]
SETS = [f"train.max_steps={STEPS}", f"eval.every={EVERY}", f"eval.t_bins={T_BINS}", "eval.seed=7",
        "optim.warmup_steps=0", "optim.lr=1e-3", f"checkpoint.every={STEPS}", "method.name=dde"]
TABLES = schedule()
MASK64 = (1 << 64) - 1


def mix_seed(seed: int, pair_id: int, stream: int) -> int:
    """include/dde/util/seed.hpp: splitmix64 chained over (id, stream)."""
    h = seed
    for part in (pair_id & MASK64, stream):
        h ^= part
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h


def png_copy(index_path: Path, out: Path) -> Path:
    """The export with every image member re-encoded as PNG (lossless: the pixels Pillow decodes
    from the JPEG). Returns the new index.json."""
    def to_png(name: str, data: bytes) -> bytes:
        if name.endswith(".json"):
            return data
        png = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(png, "PNG")
        return png.getvalue()

    return rewrite_shards(index_path, out, to_png)


def held_out_pairs(index_path: Path) -> list[dict]:
    """Every non-tie pair of the export in file order (shards in index order): id = position."""
    index = json.loads(index_path.read_text())
    pairs = []
    for shard in index["shards"]:
        members: dict[str, dict] = {}
        with tarfile.open(index_path.parent / shard["file"]) as tar:
            for member in tar.getmembers():
                key, rest = member.name.split(".", 1)
                members.setdefault(key, {})[rest] = tar.extractfile(member).read()
        for key, m in members.items():
            meta = json.loads(m["json"])
            if meta["label_0"] == 0.5:
                continue
            winner = "0.jpg" if meta["label_0"] == 1.0 else "1.jpg"
            loser = "1.jpg" if winner == "0.jpg" else "0.jpg"
            pairs.append({"ids": meta["input_ids"][0], "winner": m[winner], "loser": m[loser]})
    return pairs


def preprocess(jpeg: bytes, size: int) -> torch.Tensor:
    """Diffusion-DPO's Resize(size, BILINEAR) -> CenterCrop(size) -> ToTensor -> Normalize(0.5)."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.5


@torch.no_grad()
def recompute(fixtures: Path, checkpoint: Path, seed: int, index: Path, dtype=torch.float32) -> dict:
    """The eval record of `checkpoint`'s step, recomputed with diffusers (dde, beta 5000, s 1) in
    `dtype` (the noise is drawn in float32, as the trainer draws it, then converted)."""
    source = fixtures / "source" / "sd15"
    vae = AutoencoderKL.from_pretrained(source / "vae").eval().to(dtype)
    text = CLIPTextModel.from_pretrained(source / "text_encoder").eval().to(dtype)
    policy = UNet2DConditionModel.from_pretrained(checkpoint / "unet").eval().to(dtype)
    reference = UNet2DConditionModel.from_pretrained(source / "unet").eval().to(dtype)
    E = np.asarray(json.loads((checkpoint / "correction_ema.json").read_text())["E"])
    pairs = held_out_pairs(index)
    deltas = np.zeros((len(T_BINS), len(pairs)))
    for pid, pair in enumerate(pairs):
        images = torch.stack([preprocess(pair["winner"], 64), preprocess(pair["loser"], 64)]).to(dtype)
        dist = vae.encode(images).latent_dist
        g = torch.Generator().manual_seed(mix_seed(seed, pid, 0))
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, dtype=torch.float32)
                             for _ in range(2)]).to(dtype)
        latents = (dist.mean + dist.std * noise) * vae.config.scaling_factor
        cond = text(torch.tensor([pair["ids"]] * 2)).last_hidden_state
        for j, t in enumerate(T_BINS):
            g = torch.Generator().manual_seed(mix_seed(seed, pid, 1 + t))
            eps = torch.randn(latents.shape[1:], generator=g, dtype=torch.float32).to(dtype).expand_as(latents)
            abar = TABLES["abar"][t]
            x_t = (math.sqrt(abar) * latents + math.sqrt(1 - abar) * eps).to(dtype)
            steps = torch.full((2,), t)
            e_pol = ((policy(x_t, steps, cond).sample - eps) ** 2).flatten(1).mean(1).double()
            e_ref = ((reference(x_t, steps, cond).sample - eps) ** 2).flatten(1).mean(1).double()
            deltas[j, pid] = float((e_pol[0] - e_ref[0]) - (e_pol[1] - e_ref[1]))
    c = TABLES["c"][T_BINS][:, None]
    C = np.array([E[t + 1:].sum() for t in T_BINS])[:, None]
    z = -0.5 * 5000 * c * deltas + 5000 * C
    loss = np.logaddexp(0.0, -z)  # softplus(-z)
    return {"pairs": len(pairs), "acc_by_t": (deltas < 0).mean(1), "loss_by_t": loss.mean(1),
            "delta_by_t": deltas.mean(1), "deltas": deltas, "lipschitz_by_t": 0.5 * 5000 * c[:, 0]}


@pytest.fixture(scope="module")
def png_eval(fixtures, tmp_path_factory) -> Path:
    return png_copy(fixtures / "shards" / "sd15_eval" / "index.json", tmp_path_factory.mktemp("png") / "eval")


@pytest.fixture(scope="module")
def run(dde_train, fixtures, png_eval, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "run"
    sets = tiny_overrides(fixtures, "sd15", out, held_out=True) + SETS + [f"data.eval_index={png_eval}"]
    result = run_train(dde_train, "tiny_dde.yaml", sets)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_eval_runs_at_step_0_every_n_and_the_last_step_only(run, fixtures, dde_train, tmp_path):
    evals = read_records(run, "eval")
    assert [e["step"] for e in evals] == [0, 3, 4]  # step 0, every 3, the last step; nothing else
    index = json.loads((fixtures / "shards" / "sd15_eval" / "index.json").read_text())
    n_pairs = sum(s["pairs"] - s["ties"] for s in index["shards"])
    for e in evals:
        assert e["pairs"] == n_pairs and e["t_bins"] == T_BINS and e["method"] == "dde"
        for key in ("implicit_acc_by_t", "loss_by_t", "delta_by_t"):
            assert len(e[key]) == len(T_BINS)
        # Overall = mean over bins (every bin holds every pair).
        assert e["implicit_acc"] == pytest.approx(np.mean(e["implicit_acc_by_t"]), abs=1e-12)
        assert e["loss"] == pytest.approx(np.mean(e["loss_by_t"]), rel=1e-12)
    # The training records are untouched by the evaluation.
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # Without data.eval_index there is no evaluation at all.
    off = tmp_path / "off"
    result = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", off) + SETS[:1] + ["train.max_steps=1"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_records(off, "eval") == [] and len(read_records(off, "step")) == 1


def test_step_0_has_delta_zero_and_loss_log_2(run):
    first, last = read_records(run, "eval")[0], read_records(run, "eval")[-1]
    assert first["step"] == 0
    # Policy = reference before training: identical errors, so Delta = 0 exactly, no pair ranked
    # (the strict Delta < 0 of Diffusion-DPO's implicit accuracy), loss = log 2 (E = 0 too).
    assert first["delta_by_t"] == [0.0] * len(T_BINS) and first["implicit_acc"] == 0.0
    assert first["loss_by_t"] == pytest.approx([math.log(2)] * len(T_BINS), abs=1e-15)
    # After 4 steps at lr 1e-3 the policy has moved: the figures are not stuck at their start.
    assert all(d != 0.0 for d in last["delta_by_t"]) and 0.0 < last["implicit_acc"]


def _check_against_recomputation(run: Path, fixtures: Path, index: Path, label: str) -> None:
    record = read_records(run, "eval")[-1]
    assert record["step"] == STEPS
    checkpoint = run / "checkpoints" / f"step-{STEPS:08d}"
    with default_dtype(torch.float64):
        want = recompute(fixtures, checkpoint, seed=7, index=index, dtype=torch.float64)
    single = recompute(fixtures, checkpoint, seed=7, index=index, dtype=torch.float32)
    assert record["pairs"] == want["pairs"]
    # Per bin: the float32 noise floor of a pair's Delta, measured here on this CPU's kernels.
    floor = np.abs(single["deltas"] - want["deltas"]).max(1) + 1e-30
    bound = 8 * floor
    got_delta = np.asarray(record["delta_by_t"])
    print(f"{label}: mean Delta by t C++ {got_delta.tolist()} vs float64 {want['delta_by_t'].tolist()}; "
          f"|difference| {np.abs(got_delta - want['delta_by_t']).tolist()}; float32 floor {floor.tolist()}; "
          f"smallest |Delta| {np.abs(want['deltas']).min(1).tolist()}")
    assert np.all(np.abs(got_delta - want["delta_by_t"]) <= bound), (got_delta, want["delta_by_t"], bound)
    # A Delta within `bound` moves softplus(-z) by at most 0.5 beta c_t bound (|softplus'| <= 1).
    loss_bound = want["lipschitz_by_t"] * bound
    assert np.all(np.abs(np.asarray(record["loss_by_t"]) - want["loss_by_t"]) <= loss_bound)
    # Only a pair whose |Delta| lies within the bound may be classified differently.
    unsure = (np.abs(want["deltas"]) <= bound[:, None]).mean(1)
    assert np.all(np.abs(np.asarray(record["implicit_acc_by_t"]) - want["acc_by_t"]) <= unsure + 1e-12)


def test_eval_equals_a_diffusers_recomputation_from_the_checkpoint(run, fixtures, png_eval):
    _check_against_recomputation(run, fixtures, png_eval, "1 rank")


def test_two_ranks_evaluate_disjoint_shares_of_the_same_figures(dde_train, fixtures, png_eval, tmp_path):
    two = tmp_path / "two"
    sets = tiny_overrides(fixtures, "sd15", two, held_out=True) + SETS + [f"data.eval_index={png_eval}"]
    for rc, err in finish(launch(dde_train, 2, sets)):
        assert rc == 0, err[-3000:]
    assert [e["step"] for e in read_records(two, "eval")] == [0, 3, 4]
    _check_against_recomputation(two, fixtures, png_eval, "2 ranks")


def test_resume_rewrites_the_eval_of_its_step_once_and_exactly(run, dde_train, fixtures, png_eval, tmp_path):
    halves = tmp_path / "halves"
    sets = tiny_overrides(fixtures, "sd15", halves, held_out=True) + SETS + [f"data.eval_index={png_eval}"]
    first = run_train(dde_train, "tiny_dde.yaml", sets + ["train.max_steps=3"])
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_train(dde_train, "tiny_dde.yaml", sets, resume=True)
    assert second.returncode == 0, second.stderr[-4000:]
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(read_records(halves, "eval")) == strip(read_records(run, "eval"))
