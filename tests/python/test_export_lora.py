"""export_diffusers on LoRA checkpoints (docs/formats.md §3): `--lora` writes a diffusers LoRA folder
that `load_lora_weights` puts on the base pipeline, `--pipeline BASE` the merged UNet in a whole
pipeline; both must give the policy W0 + (alpha / rank) B A. The checkpoints are made here, in the
layout dde_train writes (lora/adapter_model.safetensors, lora/lora.json), on the tiny fixture
pipelines, with random non-zero A and B on every attention projection; the reference is the base
UNet with (alpha / rank) B A added to its weights. Loading a LoRA needs peft (diffusers' PEFT
backend).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dde_tools import export_diffusers

WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4
LORA_TOL = 1e-4    # load_lora_weights: peft computes W0 x + s B (A x), not (W0 + s B A) x
MERGED_TOL = 1e-5  # the merged UNet: the same weights up to float32 rounding of the sum
# (family, alpha): alpha == rank (scale 1) and alpha != rank (scale 0.5: diffusers must be told).
CASES = [("sd15", 4.0), ("sd15", 2.0), ("sdxl", 4.0), ("sdxl", 2.0)]


def export(*argv: str | Path) -> tuple[int, str, str]:
    """export_diffusers.main in-process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = export_diffusers.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def adapted_modules(config: dict) -> dict[str, tuple[int, int]]:
    """Module -> (in, out) of every nn.Linear of the UNet ending in one of TARGETS."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS)}


def make_lora_checkpoint(step: Path, base: Path, alpha: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete LoRA checkpoint in `step` (the files dde_train writes); returns its adapters."""
    config = json.loads((base / "unet" / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_in, n_out) in adapted_modules(config).items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(RANK, n_in, generator=gen) / n_in ** 0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(n_out, RANK, generator=gen) * 0.2
    (step / "lora").mkdir(parents=True)
    save_file(tensors, str(step / "lora" / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = {"format": "dde-lora", "version": 1, "rank": RANK, "alpha": alpha, "targets": TARGETS,
            "modules": sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight")),
            "base": {"manifest": str(base.parent / "export" / "manifest.json"), "unet_sha256": "0" * 64},
            "unet_config": config}
    (step / "lora" / "lora.json").write_text(json.dumps(lora, indent=2) + "\n")
    (step / "trainer_state.json").write_text(json.dumps({"format": "dde-checkpoint", "version": 1,
                                                         "step": 7}))
    (step / "rank-00000.json").write_text(json.dumps({"rank": 0, "world_size": 1}))
    (step / "COMPLETE").write_text(step.name.removeprefix("step-") + "\n")
    return tensors


def reference_unet(base: Path, tensors: dict[str, torch.Tensor], scale: float):
    """The base UNet with scale * B @ A added to each adapted weight: the policy, computed directly."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                modules[module].weight += scale * (tensors[f"{module}.lora_B.weight"] @ a)
    return unet


def predict(unet) -> torch.Tensor:
    """Noise predictions on fixed inputs (latents, timesteps, text embeddings; SDXL: added cond)."""
    config = unet.config
    gen = torch.Generator().manual_seed(1)
    batch, size = 3, config.sample_size
    sample = torch.randn(batch, config.in_channels, size, size, generator=gen)
    timestep = torch.tensor([3, 500, 999])
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=gen)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0],
                                 [128.0, 64.0, 0.0, 32.0, 64.0, 64.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=gen), "time_ids": time_ids}
    with torch.no_grad():
        return unet(sample, timestep, text, **kwargs).sample


@pytest.fixture(scope="module")
def peft_backend() -> None:
    if importlib.util.find_spec("peft") is None:
        pytest.fail("peft is not installed: diffusers' load_lora_weights needs it (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def exported(fixture_dir, tmp_path_factory) -> dict:
    """Per case: the checkpoint, its --lora export, its merged export and the reference predictions."""
    result = {}
    for family, alpha in CASES:
        root = tmp_path_factory.mktemp(f"lora_{family}_{alpha:g}")
        base = fixture_dir / family
        step = root / "run" / "checkpoints" / "step-00000007"
        tensors = make_lora_checkpoint(step, base, alpha)
        code, stdout, stderr = export("--checkpoint", step, "--out", root / "lora_out", "--lora")
        assert code == 0, stderr
        assert f"scale {alpha / RANK:g}" in stdout
        code, _, stderr = export("--checkpoint", root / "run", "--out", root / "merged", "--pipeline", base)
        assert code == 0, stderr
        base_unet = reference_unet(base, {}, 0.0)
        result[(family, alpha)] = {"base": base, "step": step, "tensors": tensors, "lora_out": root / "lora_out",
                                   "merged": root / "merged",
                                   "reference": predict(reference_unet(base, tensors, alpha / RANK)),
                                   "untrained": predict(base_unet)}
    return result


@pytest.mark.parametrize("family, alpha", CASES)
def test_load_lora_weights_gives_the_policy(exported, peft_backend, family, alpha) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging

    case = exported[(family, alpha)]
    pipeline_class = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[family]
    pipe = pipeline_class.from_pretrained(case["base"])
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "No LoRA keys associated to CLIPTextModel found": there are none
    try:
        pipe.load_lora_weights(case["lora_out"])
    finally:
        logging.set_verbosity(verbosity)
    got = predict(pipe.unet.eval())
    err = (got - case["reference"]).abs().max().item()
    moved = (case["untrained"] - case["reference"]).abs().max().item()
    print(f"{family} alpha {alpha:g}: max |load_lora_weights - reference| = {err:.2e} (the adapters move "
          f"the prediction by {moved:.2e})")
    assert err <= LORA_TOL
    assert moved > 100 * LORA_TOL  # the adapters matter at this tolerance


@pytest.mark.parametrize("family, alpha", CASES)
def test_the_merged_pipeline_gives_the_policy(exported, family, alpha) -> None:
    from diffusers import DiffusionPipeline

    case = exported[(family, alpha)]
    pipe = DiffusionPipeline.from_pretrained(case["merged"])
    assert type(pipe).__name__ == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    err = (predict(pipe.unet.eval()) - case["reference"]).abs().max().item()
    print(f"{family} alpha {alpha:g}: max |merged export - reference| = {err:.2e}")
    assert err <= MERGED_TOL
    info = json.loads((case["merged"] / "dde_export.json").read_text())
    assert info["lora"]["scale"] == alpha / RANK and info["step"] == 7
    # Everything but the UNet is the base pipeline's, byte for byte.
    assert (case["merged"] / "vae" / WEIGHTS).read_bytes() == (case["base"] / "vae" / WEIGHTS).read_bytes()


def test_the_lora_file_is_what_diffusers_writes(exported) -> None:
    """Keys unet.<module>.lora_A/B.weight (save_lora_weights of a peft state dict), the adapters
    unchanged, and rank and alpha in the lora_adapter_metadata diffusers reads."""
    case = exported[("sd15", 2.0)]
    path = case["lora_out"] / "pytorch_lora_weights.safetensors"
    assert {p.name for p in case["lora_out"].iterdir()} == {path.name, "dde_export.json", ".dde_tool_output.json"}
    written = load_file(str(path))
    assert written.keys() == {f"unet.{k}" for k in case["tensors"]}
    assert all(torch.equal(written[f"unet.{k}"], t) for k, t in case["tensors"].items())
    with safe_open(str(path), "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (RANK, 2.0)
    assert sorted(metadata["unet.target_modules"]) == sorted(k.removesuffix(".lora_A.weight")
                                                             for k in case["tensors"] if "lora_A" in k)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming what, where, expected and found; no OUT, no staging folder

@pytest.fixture(scope="module")
def good_checkpoint(fixture_dir, tmp_path_factory) -> Path:
    step = tmp_path_factory.mktemp("lora_good") / "step-00000007"
    make_lora_checkpoint(step, fixture_dir / "sd15", 8.0)
    return step


@pytest.fixture
def lora_step(good_checkpoint, tmp_path) -> Path:
    """A copy of the good sd15 LoRA checkpoint that a test may damage."""
    step = tmp_path / "ckpt" / "step-00000007"
    shutil.copytree(good_checkpoint, step)
    return step


def expect_refused(tmp_path: Path, *argv, fragments: tuple[str, ...], loaded: list | None = None) -> str:
    out = tmp_path / "out"
    code, stdout, stderr = export(*argv, "--out", out)
    assert code == 2, stdout + stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export_diffusers: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in: {stderr}"
    assert not out.exists()
    assert not list(tmp_path.glob("out.dde-*")), "a staging folder was left"
    if loaded is not None:
        assert loaded == [], f"tensors were loaded before the header was checked: {loaded}"
    return stderr


def _edit_json(step: Path, **changes) -> Path:
    path = step / "lora" / "lora.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def _edit_tensors(step: Path, change) -> Path:
    path = step / "lora" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def weight_loads(monkeypatch) -> list[str]:
    """Records every safetensors file loaded whole (the header checks must come first)."""
    import safetensors.torch

    loads = []
    load = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: loads.append(str(a[0])) or load(*a, **k))
    return loads


MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def test_lora_on_a_full_checkpoint_is_refused(fixture_dir, tmp_path) -> None:
    step = tmp_path / "step-00000001"
    (step / "unet").mkdir(parents=True)
    for name in ("config.json", WEIGHTS):
        shutil.copyfile(fixture_dir / "sd15" / "unet" / name, step / "unet" / name)
    (step / "trainer_state.json").write_text("{}")
    (step / "COMPLETE").write_text("1\n")
    expect_refused(tmp_path, "--checkpoint", step, "--lora",
                   fragments=(str(step), "--lora needs a LoRA checkpoint", "found unet/: a full checkpoint",
                              "Export it without --lora"))


def test_a_lora_checkpoint_needs_lora_or_a_pipeline(lora_step, tmp_path) -> None:
    expect_refused(tmp_path, "--checkpoint", lora_step,
                   fragments=("a LoRA checkpoint needs --lora or --pipeline", "Pass --lora, or --pipeline"))


def test_lora_and_pipeline_together_are_refused(lora_step, fixture_dir, tmp_path) -> None:
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", "--pipeline", fixture_dir / "sd15",
                   fragments=("--lora and --pipeline together",))


def test_a_base_pipeline_of_another_unet_is_refused(lora_step, fixture_dir, tmp_path) -> None:
    expect_refused(tmp_path, "--checkpoint", lora_step, "--pipeline", fixture_dir / "sdxl",
                   fragments=("lora.json (unet_config)'s UNet does not fit this pipeline", "(the pipeline's UNet, ",
                              "Pass the pipeline the run was exported from"))


def test_a_missing_lora_json_is_named(lora_step, tmp_path) -> None:
    (lora_step / "lora" / "lora.json").unlink()
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora",
                   fragments=(f"{lora_step / 'lora' / 'lora.json'}: missing from the LoRA checkpoint",))


@pytest.mark.parametrize("text, fragment", [
    ('{"format": "dde-lora", "version": 1,', "not valid JSON"),
    ("[1, 2]", "not a JSON object: expected the lora.json dde_train writes"),
])
def test_a_lora_json_that_is_not_an_object_is_named(lora_step, tmp_path, text, fragment) -> None:
    (lora_step / "lora" / "lora.json").write_text(text)
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", fragments=(str(lora_step / "lora" / "lora.json"),
                                                                            fragment))


@pytest.mark.parametrize("changes, fragments", [
    ({"format": "peft"}, ('lora.json: format: not a dde LoRA description: expected "format": "dde-lora"; '
                          'found "peft"',)),
    ({"version": 2}, ("lora.json: version: ", "expected version 1; found 2")),
    ({"version": True}, ("expected version 1; found true",)),
    ({"rank": 0}, ("lora.json: rank: a bad value: expected an integer >= 1; found 0",)),
    ({"rank": 4.5}, ("rank: a bad value: expected an integer >= 1; found 4.5",)),
    ({"rank": ...}, ("rank: a bad value: expected an integer >= 1; found null",)),
    ({"alpha": 0}, ("lora.json: alpha: a bad value: expected a finite number > 0; found 0",)),
    ({"alpha": -2.0}, ("alpha: a bad value: expected a finite number > 0; found -2.0",)),
    ({"alpha": float("nan")}, ("alpha: a bad value: expected a finite number > 0; found NaN",)),
    ({"alpha": float("inf")}, ("alpha: a bad value: expected a finite number > 0; found Infinity",)),
    ({"alpha": "8"}, ('alpha: a bad value: expected a finite number > 0; found "8"',)),
    ({"targets": "to_q"}, ('targets: a bad value: expected a non-empty list of module names (strings); '
                           'found "to_q"',)),
    ({"targets": []}, ("targets: a bad value", "found []")),
    ({"targets": ["to_q", 3]}, ("targets: a bad value", 'found ["to_q", 3]')),
    ({"unet_config": "{}"}, ("unet_config: a bad value: expected the base UNet's diffusers config",)),
])
def test_bad_lora_json_fields_are_named(lora_step, tmp_path, weight_loads, changes, fragments) -> None:
    path = _edit_json(lora_step, **changes)
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", fragments=(str(path), *fragments),
                   loaded=weight_loads)


def test_a_rank_that_is_not_the_adapters_is_named(lora_step, tmp_path, weight_loads) -> None:
    _edit_json(lora_step, rank=8)
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", loaded=weight_loads, fragments=(
        "lora_A of the wrong shape: expected [8, 64] ([rank, in_features] with rank 8 from lora.json",
        "found [4, 64]"))


@pytest.mark.parametrize("change, fragments", [
    (lambda t: t.pop(f"{MODULE}.lora_B.weight"),
     (f"{MODULE}.lora_A.weight: lora_A without its lora_B", f"found no {MODULE}.lora_B.weight")),
    (lambda t: t.pop(f"{MODULE}.lora_A.weight"), (f"{MODULE}.lora_B.weight: lora_B without its lora_A",)),
    (lambda t: t.update({f"{MODULE}.lora_A.weight": t[f"{MODULE}.lora_A.weight"].half()}),
     (f"{MODULE}.lora_A.weight: an adapter tensor that is not float32: expected dtype F32; found F16",)),
    (lambda t: t.update({f"{MODULE}.lora_A.weight": torch.ones(3, 64)}),
     (f"{MODULE}.lora_A.weight: lora_A of the wrong shape: expected [4, 64]", "found [3, 64]")),
    (lambda t: t.update({f"{MODULE}.lora_B.weight": torch.ones(64, 5)}),
     (f"{MODULE}.lora_B.weight: lora_B of the wrong shape: expected [64, 4] ([out_features, rank]",
      "found [64, 5]")),
    (lambda t: t.update({f"{MODULE}.lora_B.weight": torch.ones(64, 4, 1)}), ("found [64, 4, 1]",)),
    (lambda t: t.update({"conv_in.weight": torch.ones(2)}),
     ("conv_in.weight: not a LoRA tensor name: expected <module>.lora_A.weight or <module>.lora_B.weight",)),
    (lambda t: t.update({f"{MODULE}.lora_A.bias": torch.ones(2)}), ("lora_A.bias: not a LoRA tensor name",)),
    (lambda t: t.update({f"unet.{k}": t.pop(k) for k in list(t)}),
     ("an adapter of no linear layer of the base UNet", "(names carry no 'unet.' prefix); found no such module")),
    (lambda t: t.update({"conv_in.lora_A.weight": torch.ones(4, 4), "conv_in.lora_B.weight": torch.ones(4, 4)}),
     ("conv_in.lora_A.weight: an adapter of no linear layer of the base UNet", "found a Conv2d")),
    (lambda t: t.update({"time_embedding.linear_1.lora_A.weight": torch.ones(4, 32),
                         "time_embedding.linear_1.lora_B.weight": torch.ones(128, 4)}),
     ("time_embedding.linear_1.lora_A.weight: an adapter of a module no target names",)),
    (lambda t: [t.pop(f"{MODULE}.lora_{p}.weight") for p in "AB"],
     ("linear layers lora.json's targets name have no adapters", f"1 without, such as ['{MODULE}']")),
    (lambda t: t.clear(), ("no adapters: expected a lora_A and lora_B tensor for each adapted module",)),
])
def test_bad_adapters_are_named_before_loading(lora_step, tmp_path, weight_loads, change, fragments) -> None:
    path = _edit_tensors(lora_step, change)
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", fragments=(str(path), *fragments),
                   loaded=weight_loads)


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_non_finite_adapter_is_named(lora_step, fixture_dir, tmp_path, pipeline) -> None:
    path = _edit_tensors(lora_step, lambda t: t[f"{MODULE}.lora_B.weight"].__setitem__((0, 0), float("nan")))
    expect_refused(tmp_path, "--checkpoint", lora_step, *(["--pipeline", fixture_dir / "sd15"] if pipeline
                                                          else ["--lora"]),
                   fragments=(f"{path}: {MODULE}.lora_B.weight holds non-finite values",))


def test_a_truncated_adapter_file_is_named(lora_step, tmp_path) -> None:
    path = lora_step / "lora" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    expect_refused(tmp_path, "--checkpoint", lora_step, "--lora", fragments=(str(path),
                                                                            "not a readable safetensors file"))


def test_a_base_pipeline_without_its_unet_weights_is_named(lora_step, fixture_dir, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(fixture_dir / "sd15", base)
    (base / "unet" / WEIGHTS).unlink()
    expect_refused(tmp_path, "--checkpoint", lora_step, "--pipeline", base,
                   fragments=(str(base / "unet" / WEIGHTS), "the base pipeline's UNet is missing"))
