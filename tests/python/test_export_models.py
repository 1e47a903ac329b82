"""Tests of dde_tools.export_models: reloaded TorchScript vs diffusers, manifest fields, failure paths."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dde_tools import export_models

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
LIMIT = 1e-4
COMPONENTS = {
    "sd15": ["unet", "unet_batch1_odd", "text_encoder", "vae_encoder", "vae_decoder"],
    "sdxl": ["unet", "unet_batch1_odd", "text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder"],
}
PROMPTS = ["a red cat at sunset, oil painting", "", "two giant glowing dragons in tokyo"]


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


def load(export, name: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(export.out / f"{name}.pt"))


def encode_with_export(export, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embedding and pooled embedding built from the exported encoders as the manifest says."""
    hidden, pooled = [], {}
    for entry in export.manifest["text_encoders"]:
        tokenizer = CLIPTokenizer.from_pretrained(export.out / entry["tokenizer"])
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=entry["max_length"],
                        return_tensors="pt").input_ids
        h, p = load(export, entry["name"])(ids)
        hidden.append(h)
        pooled[entry["name"]] = p
    pooled_from = export.manifest["text_embedding"]["pooled_from"]
    return torch.cat(hidden, dim=-1), pooled[pooled_from] if pooled_from else None


def test_sd15_text_encoder_matches_pipeline_encode_prompt(exports) -> None:
    export = exports["sd15"]
    pipe = StableDiffusionPipeline.from_pretrained(export.pipeline)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        got, _ = encode_with_export(export, PROMPTS)
    assert max_err(got, want) <= LIMIT


def test_sdxl_text_encoders_match_pipeline_encode_prompt(exports) -> None:
    export = exports["sdxl"]
    pipe = StableDiffusionXLPipeline.from_pretrained(export.pipeline)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        got, got_pooled = encode_with_export(export, PROMPTS)
    assert got.shape == (3, 77, 64)
    assert max_err(got, want) <= LIMIT
    assert max_err(got_pooled, want_pooled) <= LIMIT


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_vae_matches_diffusers(exports, family: str) -> None:
    export = exports[family]
    vae = AutoencoderKL.from_pretrained(export.pipeline, subfolder="vae").eval()
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        mean, logvar = load(export, "vae_encoder")(image)
        dist = vae.encode(image).latent_dist
        decoded = load(export, "vae_decoder")(latents)
        want_decoded = vae.decode(latents).sample
    assert max_err(mean, dist.mean) <= LIMIT and max_err(logvar, dist.logvar) <= LIMIT
    assert max_err(decoded, want_decoded) <= LIMIT


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parity_errors_printed_and_recorded(exports, family: str) -> None:
    export = exports[family]
    printed = dict(re.findall(r"^parity (\w+): max_abs_err=(\S+) ", export.stdout, flags=re.M))
    assert list(printed) == COMPONENTS[family]
    recorded = export.manifest["parity_max_abs_err"]
    assert list(recorded) == COMPONENTS[family]
    for name, value in recorded.items():
        assert 0.0 <= value <= LIMIT
        assert float(printed[name]) == pytest.approx(value, rel=1e-3, abs=1e-12)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_manifest_fields(exports, family: str) -> None:
    export = exports[family]
    m = export.manifest
    pipeline = export.pipeline
    assert (m["format"], m["version"], m["family"]) == ("dde-manifest", 2, family)
    assert m["source"] == str(pipeline.resolve()) and m["torch_version"] == torch.__version__.split("+")[0]
    assert m["resolution"] == 64 and m["dropout_removed"] is True
    scaling = 0.18215 if family == "sd15" else 0.13025
    assert m["latent"] == {"channels": 4, "downsample": 8, "scaling_factor": scaling}
    assert m["schedule"] == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    assert m["unet"]["config"] == unet_config
    blocks = m["unet"]["blocks"]
    assert [b["name"] for b in blocks] == [
        "input", "down_blocks.0.0", "down_blocks.0.downsample", "down_blocks.1.0", "mid_block",
        "up_blocks.0.0", "up_blocks.0.1", "up_blocks.0.upsample", "up_blocks.1.0", "up_blocks.1.1", "output"]
    assert [b["kind"] for b in blocks] == ["input"] + ["down"] * 3 + ["mid"] + ["up"] * 5 + ["output"]
    for block in blocks:
        assert block["file"] == f"unet/{block['name']}.pt" and (export.out / block["file"]).is_file()
    # conv_in, the resnet, the downsampler and the last down resnet push; each up resnet pops one.
    assert [b["push_output"] for b in blocks] == [True] * 4 + [False] * 7
    assert [b["pops"] for b in blocks] == [0] * 5 + [1, 1, 0, 1, 1, 0]
    assert [b["takes_size"] for b in blocks] == [False] * 7 + [True] + [False] * 3
    assert blocks[1]["params"] == [{"prefix": "resnet.", "diffusers": "down_blocks.0.resnets.0."},
                                   {"prefix": "attn.", "diffusers": "down_blocks.0.attentions.0."}]
    assert m["vae"] == {"encoder": "vae_encoder.pt", "decoder": "vae_decoder.pt"}

    names = COMPONENTS[family][2:-2]
    assert [e["name"] for e in m["text_encoders"]] == names
    assert m["text_embedding"]["concat"] == names
    assert m["text_embedding"]["dim"] == m["unet"]["cross_attention_dim"] == 32 * len(names)
    if family == "sd15":
        assert m["unet"]["added_cond"] is None and m["text_embedding"]["pooled_from"] is None
    else:
        assert m["unet"]["added_cond"] == {"text_embeds_dim": 32, "time_ids_dim": 6}
        assert m["text_embedding"]["pooled_from"] == "text_encoder_2"
    for entry in m["text_encoders"]:
        folder = export.out / entry["tokenizer"]
        assert (folder / "vocab.json").read_bytes() == (pipeline / entry["tokenizer"] / "vocab.json").read_bytes()
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert entry["file"] == f"{entry['name']}.pt" and (export.out / entry["file"]).is_file()
        assert entry["hidden_output"] == ("last" if family == "sd15" else "penultimate")
        assert (entry["hidden_size"], entry["pooled_size"], entry["max_length"]) == (32, 32, 77)
        assert entry["pad_token_id"] == tokenizer.pad_token_id
        assert entry["vocab_sha256"] == hashlib.sha256((folder / "vocab.json").read_bytes()).hexdigest()
        pad = tokenizer.pad_token_id
        assert entry["empty_prompt_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * 75
    if family == "sdxl":
        assert [e["pad_token_id"] for e in m["text_encoders"]] == [m["text_encoders"][0]["empty_prompt_ids"][1], 0]


def test_broken_component_fails_the_export(exports, tmp_path: Path, monkeypatch, capsys) -> None:
    original = export_models.VaeDecoder.forward
    monkeypatch.setattr(export_models.VaeDecoder, "forward", lambda self, z: original(self, z) + 1e-3)
    code = export_models.main(["--pipeline", str(exports["sd15"].pipeline), "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert re.search(r"parity vae_decoder: max_abs_err=1\.0\d\de-03", out)
    assert "parity check failed (limit 1e-04) for vae_decoder: max_abs_err=1.0" in err
    assert "unet" not in err and not (tmp_path / "manifest.json").exists()


def test_zero_tolerance_reports_every_component_over_it(exports, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(export_models, "max_abs_error", lambda loaded, component: 5e-5)
    code = export_models.main(["--pipeline", str(exports["sd15"].pipeline), "--out", str(tmp_path),
                               "--max-abs-err", "0"])
    err = capsys.readouterr().err
    assert code == 1
    for name in COMPONENTS["sd15"][2:]:  # the UNet's parity is its own block composition
        assert f"{name}: max_abs_err=5.000e-05" in err


def test_bad_pipeline_folder_exits_2(exports, tmp_path: Path, capsys) -> None:
    pipeline = tmp_path / "pipe"
    shutil.copytree(exports["sd15"].pipeline, pipeline)
    index = json.loads((pipeline / "model_index.json").read_text())
    (pipeline / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    assert export_models.main(["--pipeline", str(pipeline), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json: _class_name is 'FluxPipeline', expected one of" in err
    assert export_models.main(["--pipeline", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "model_index.json: file not found" in capsys.readouterr().err
    assert export_models.main(["--pipeline", str(exports["sd15"].pipeline), "--out", str(tmp_path / "out"),
                               "--resolution", "60"]) == 2
    assert "--resolution 60: expected a positive multiple of 8" in capsys.readouterr().err
