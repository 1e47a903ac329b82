"""eval.sample: validation images during training.

At step 0 the policy is the base model, so the trainer's step-0 grid must be what diffusers'
own pipeline draws from the base pipeline with the same prompts, seeds and scheduler (DDIM,
leading spacing, classifier-free guidance against ""). A wrong timestep order, a missing
guidance term, the VAE scaling factor applied twice, an SDXL time-id mix-up or other noise per
image all change these pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import default_dtype, run_train, tiny_overrides

torch.set_num_threads(1)

STEPS, GUIDANCE, SEED, PROMPTS = 8, 3.0, 7, 3


def diffusers_images(pipeline_dir, family: str, captions: list[str], resolution: int,
                     channels: int, downsample: int, dtype=torch.float32) -> np.ndarray:
    """diffusers' images in [0, 1] before the rounding to 8 bits, computed in `dtype` (the noise
    drawn in float32, as the trainer draws it)."""
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(pipeline_dir, **kwargs).to(dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    h = resolution // downsample
    images = []
    for i, caption in enumerate(captions):
        latents = torch.randn((1, channels, h, h), generator=torch.Generator().manual_seed(SEED + i),
                              dtype=torch.float32).to(dtype)
        extra = {"negative_prompt": "", "negative_prompt_2": ""} if family == "sdxl" else {}
        out = pipe(caption, height=resolution, width=resolution, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=latents, output_type="np", **extra)
        images.append(out.images[0].astype(np.float64))
    return np.stack(images)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_step0_grid_is_diffusers_sampling_of_the_base(dde_train, fixtures, tmp_path, family):
    out = tmp_path / family
    sets = tiny_overrides(fixtures, family, out, held_out=True) + [
        "train.max_steps=2", "eval.every=100", "eval.t_bins=[500]", "logging.per_sample=false",
        "checkpoint.every=100", "logging.tensorboard=true",
        f"eval.sample={{every: 2, prompts: {PROMPTS}, steps: {STEPS}, guidance: {GUIDANCE}, seed: {SEED}}}",
    ]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = out / "samples"
    assert sorted(p.name for p in samples.glob("step-*.png")) == ["step-00000000.png", "step-00000002.png"]
    meta = json.loads((samples / "prompts.json").read_text())
    captions = [c["caption"] for c in meta["cells"]]
    assert len(captions) == PROMPTS and len(set(captions)) == PROMPTS
    assert [c["seed"] for c in meta["cells"]] == [SEED + i for i in range(PROMPTS)]

    manifest = json.loads((fixtures / "export" / family / "manifest.json").read_text())
    res = manifest["resolution"]
    grid = np.asarray(Image.open(samples / "step-00000000.png").convert("RGB"))
    assert grid.shape == (res, PROMPTS * res, 3)  # one row of PROMPTS cells
    ours = np.stack([grid[:, i * res:(i + 1) * res] for i in range(PROMPTS)])
    shape = (fixtures / "source" / family, family, captions, res, manifest["latent"]["channels"],
             manifest["latent"]["downsample"])
    single = diffusers_images(*shape)
    with default_dtype(torch.float64):
        exact = diffusers_images(*shape, dtype=torch.float64)
    theirs = (exact * 255).round().astype(np.int16)  # numpy_to_pil's rounding
    diff = np.abs(ours.astype(np.int16) - theirs)
    # The float32 noise floor in levels, per pixel (diffusers float32 against float64, on this
    # processor's kernels). The trainer's float32 image lies within 8 floors of the float64 one: a
    # pixel can round to another level only where it lies that close to a rounding boundary, so
    # at most ceil(8 max floor) levels anywhere, and on average a fraction of pixels of about
    # 8 x the mean floor (a level boundary falls within 8 floors of a uniform value that often).
    floor = np.abs(single - exact) * 255
    print(f"pixel difference to float64 max {diff.max()} mean {diff.mean():.5f}; float32 floor max "
          f"{floor.max():.2e} mean {floor.mean():.2e} levels")
    assert diff.max() <= max(1, int(np.ceil(8 * floor.max()))), (diff.max(), floor.max())
    assert diff.mean() <= 8 * floor.mean() + 1 / diff.size, (diff.mean(), floor.mean())
    assert theirs.std() > 5, "the base draws something: a flat image would make this test blind"

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 2]
    first = events.Images("samples")[0]
    assert (first.height, first.width) == grid.shape[:2]
    assert first.encoded_image_string == (samples / "step-00000000.png").read_bytes()
    tags = events.Tags()["scalars"]
    assert "eval/credit_t500" in tags and "eval/misranked_t500" in tags
    assert any(t.startswith("train/credit_bin") for t in tags)


def test_sample_config_is_validated(dde_train, fixtures, tmp_path):
    out = tmp_path / "bad"
    for setting, words in [("eval.sample.steps=0", "eval.sample.steps"),
                           ("eval.sample.prompts=65", "eval.sample.prompts"),
                           ("eval.sample.stepz=3", "did you mean 'eval.sample.steps'"),
                           ("eval.sample.steps=1000", "DDIM steps outside the schedule")]:
        sets = tiny_overrides(fixtures, "sd15", out) + ["train.max_steps=1", "eval.sample.every=1", setting]
        r = run_train(dde_train, "tiny_dde.yaml", sets, timeout=120)
        assert r.returncode != 0 and words in r.stderr, (setting, r.stderr[-2000:])
