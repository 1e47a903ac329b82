"""The trainer's forward path against an independent recomputation with diffusers.

dde_train dumps one micro-batch of a real run (logging.dump_step): the images after
augmentation, the token ids after caption dropout, t, the noise, the VAE posterior noise, the
SDXL time ids and the four per-pair errors it computed. Here diffusers recomputes those errors
from the checkpoint's weights (the policy of step 1, which step 2 trains from) and the source
pipeline (reference UNet, VAE, text encoders): VAE encode, DDPMScheduler.add_noise, text
encoders (penultimate states and pooled embedding for SDXL), UNet. A swapped time_ids order, a
pooled/hidden mix-up or a wrong scaling factor changes these numbers.

The recomputation runs in float32 and in float64: the trainer's errors must lie within 8 times the
float32 noise floor (diffusers float32 against float64, measured in the test) of the float64 values.
The bound follows the processor's kernels (AVX-512, AVX2 or scalar sum in their own orders), while a
mix-up above moves the errors by orders of magnitude more.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from conftest import default_dtype, run_train, tiny_overrides

torch.set_num_threads(1)


def text_conditioning(pipeline, family: str, dump: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    if family == "sd15":
        encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").to(dtype)
        return encoder(dump["input_ids_0"]).last_hidden_state, None
    one = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").to(dtype)
    two = CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2").to(dtype)
    h1 = one(dump["input_ids_0"], output_hidden_states=True).hidden_states[-2]
    out2 = two(dump["input_ids_1"], output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trainer_errors_equal_a_diffusers_recomputation(dde_train, fixtures, tmp_path, family):
    out = tmp_path / family
    sets = tiny_overrides(fixtures, family, out) + [
        "train.max_steps=2", "checkpoint.every=1", "logging.dump_step=2", "optim.warmup_steps=0",
        "method.name=dde", "data.caption_dropout=0.5",
    ]
    r = run_train(dde_train, "tiny_dde.yaml", sets)
    assert r.returncode == 0, r.stderr[-3000:]
    dump = load_file(str(out / "debug" / "step-00000002-rank-00000.safetensors"))
    pipeline = fixtures / "source" / family

    errors = {torch.float32: recompute_errors(dump, pipeline, out, family, torch.float32)}
    with default_dtype(torch.float64):
        errors[torch.float64] = recompute_errors(dump, pipeline, out, family, torch.float64)
    want, single = errors[torch.float64], errors[torch.float32]
    # The policy did move in step 1 (else policy = reference would hide a mix-up of the two).
    assert not torch.equal(want["e_policy_w"], want["e_ref_w"])
    # The float32 noise floor of these errors, on this CPU's kernels: diffusers in float32 against
    # float64, the largest relative difference over the four errors of every pair. The trainer's
    # float32 result is another float32 rounding of the same computation, so it must lie within a
    # few floors of the float64 value, whatever kernels this processor picks.
    floor = max(((single[n] - want[n]).abs() / want[n].abs()).max().item() for n in want)
    for name, exact in want.items():
        got = dump[name].double()
        rel = ((got - exact).abs() / exact.abs()).max().item()
        print(f"[ forward parity ] {family} {name}: relative difference to float64 {rel:.3e} "
              f"(diffusers float32: {floor:.3e})")
        assert rel <= 8 * floor + 1e-12, name


@torch.no_grad()
def recompute_errors(dump: dict, pipeline, out, family: str, dtype: torch.dtype, policy=None) -> dict:
    """The four per-pair errors of the dumped micro-batch, recomputed with diffusers in `dtype`;
    the policy is the checkpoint of step 1's UNet, or policy(dtype) (a LoRA loaded into the base:
    tests/e2e/test_lora.py)."""
    cast = lambda x: x.to(dtype)  # noqa: E731
    B = dump["t"].shape[0]
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").to(dtype)
    posterior = vae.encode(cast(torch.cat([dump["winner"], dump["loser"]]))).latent_dist
    # DiagonalGaussianDistribution.sample() with the trainer's noise, times the scaling factor.
    latents = (posterior.mean + posterior.std * cast(dump["vae_noise"])) * vae.config.scaling_factor
    scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    eps = cast(torch.cat([dump["eps"], dump["eps"]]))
    t = torch.cat([dump["t"], dump["t"]])
    x_t = scheduler.add_noise(latents, eps, t)
    text, pooled = text_conditioning(pipeline, family, dump, dtype)
    kwargs = {}
    if family == "sdxl":
        time_ids = cast(torch.cat([dump["time_ids_w"], dump["time_ids_l"]]))
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([pooled, pooled]), "time_ids": time_ids}
    text = torch.cat([text, text])
    policy = (policy(dtype) if policy is not None else
              UNet2DConditionModel.from_pretrained(out / "checkpoints" / "step-00000001" / "unet").to(dtype))
    reference = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").to(dtype)
    errors = {}
    for name, unet in (("policy", policy), ("ref", reference)):
        pred = unet(x_t, t, text, **kwargs).sample
        e = (eps - pred).pow(2).flatten(1).mean(1).double()
        errors[f"e_{name}_w"], errors[f"e_{name}_l"] = e[:B], e[B:]
    return errors
