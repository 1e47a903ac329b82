"""Tests of dde_tools.export_models: reloaded TorchScript vs diffusers, manifest fields, failure paths."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_states_torchscript_deprecation_in_one_line(exports, family: str) -> None:
    lines = exports[family].stderr.splitlines()
    assert [line for line in lines if "deprecat" in line.lower()] == [line for line in lines if "note:" in line]
    assert len(lines) == 1 and lines[0].startswith('dde_tools: note: torch says "`torch.jit.trace` is deprecated.')


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


# --- Tracer warnings -------------------------------------------------------------------------


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.sum() > 0 else x  # a tensor converted to a Python bool: a TracerWarning


def test_quiet_torchscript_shows_a_new_tracer_warning() -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with export_models.quiet_torchscript():
            torch.jit.trace(_data_dependent, (torch.ones(3),), check_trace=False)
    tracer = [w for w in shown if issubclass(w.category, torch.jit.TracerWarning)]
    assert len(tracer) == 1 and "Converting a tensor to a Python boolean" in str(tracer[0].message)


def test_quiet_torchscript_hides_only_the_listed_lines() -> None:
    """The listed (module, line) pairs are hidden; the same message from another line shows."""
    message = "Converting a tensor to a Python boolean might cause the trace to be incorrect. We can't record..."
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with export_models.quiet_torchscript():
            for module, line in export_models.EXPECTED_TRACER_WARNINGS:
                name = module.replace("\\", "")
                for lineno in (line, line + 1000):
                    warnings.warn_explicit(message, torch.jit.TracerWarning, f"{name}.py", lineno, module=name)
            warnings.warn_explicit("some other tracer problem", torch.jit.TracerWarning, "upsampling.py",
                                   export_models.EXPECTED_TRACER_WARNINGS[2][1], module="diffusers.models.upsampling")
    shown_at = [(w.filename, w.lineno) for w in shown]
    listed = export_models.EXPECTED_TRACER_WARNINGS
    assert len(shown) == len(listed) + 1
    assert all(lineno not in {line for _, line in listed} for _, lineno in shown_at[:-1])
    assert str(shown[-1].message) == "some other tracer problem"


# --- Traced text encoder vs transformers -----------------------------------------------------


@pytest.mark.parametrize("eos_token_id", [2, 99])  # 2: transformers' rule for old configs (argmax of the ids)
@pytest.mark.parametrize("projected", [False, True])
def test_traced_text_encoder_matches_transformers(eos_token_id: int, projected: bool) -> None:
    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=12, projection_dim=8,
                            bos_token_id=98, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    torch.manual_seed(0)
    model_cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    model = model_cls._from_config(config, attn_implementation="sdpa").eval()
    module = export_models.TextEncoder(model, "penultimate" if projected else "last")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 98, (4, 12), generator=gen)
    ids[0, 5] = ids[0, 9] = 99  # two EOS: the first one counts
    ids[1, 11] = 99
    ids[2, 3:] = 99  # EOS padding
    ids[3, 1] = 99
    with export_models.quiet_torchscript():
        traced = torch.jit.trace(module, (ids[:2],), check_trace=False)
    with torch.no_grad():
        got, want = traced(ids), module.reference(ids)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-6
    if eos_token_id == 99:  # the pooled rows are the first EOS rows: 5, 11, 3, 1
        last = model.text_model(ids).last_hidden_state  # after the final layer norm
        rows = last[torch.arange(4), torch.tensor([5, 11, 3, 1])]
        assert torch.allclose(got[1], model.text_projection(rows) if projected else rows, atol=1e-6)


def test_attention_processors_are_swapped_only_while_tracing(exports) -> None:
    unet = UNet2DConditionModel.from_pretrained(exports["sd15"].pipeline, subfolder="unet")
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    assert before and set(before.values()) == {AttnProcessor2_0}
    with export_models.cast_free_attention(unet):
        assert {type(p) for p in unet.attn_processors.values()} == {export_models.CastFreeAttnProcessor}
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


# --- Bad input: exit 2, one message, no traceback --------------------------------------------


def edited_pipeline(exports, tmp_path: Path, family: str, file: str, drop: tuple[str, ...] = (), **changes) -> Path:
    """A copy of a tiny pipeline with one JSON file edited: keys dropped, keys set."""
    pipeline = tmp_path / "pipe"
    shutil.copytree(exports[family].pipeline, pipeline)
    path = pipeline / file
    data = json.loads(path.read_text())
    for key in drop:
        del data[key]
    path.write_text(json.dumps(data | changes))
    return pipeline


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("export_models: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the configs were checked")


# (family, file, keys dropped, keys set, what the message must say)
BAD_CONFIGS = {
    "unet_without_block_out_channels": (
        "sd15", "unet/config.json", ("block_out_channels",), {},
        "unet/config.json: required key 'block_out_channels' is missing: expected block_out_channels a list "
        "of 1 to 8 integers in [1, 8192]; found no such key."),
    "scheduler_without_prediction_type": (
        "sd15", "scheduler/scheduler_config.json", ("prediction_type",), {},
        "scheduler_config.json: required key 'prediction_type' is missing"),
    "text_encoder_without_hidden_size": (
        "sdxl", "text_encoder_2/config.json", ("hidden_size",), {},
        "text_encoder_2/config.json: required key 'hidden_size' is missing"),
    "absurd_unet_channels": (
        "sd15", "unet/config.json", (), {"block_out_channels": [32, 10**9]},
        "unet/config.json: block_out_channels out of range: expected block_out_channels a list of 1 to 8 integers "
        "in [1, 8192]; found [32, 1000000000]."),
    "absurd_latent_channels": (
        "sd15", "vae/config.json", (), {"latent_channels": 100000},
        "vae/config.json: latent_channels out of range: expected latent_channels an integer in [1, 64]; found 100000."),
    "absurd_sample_size": (
        "sdxl", "unet/config.json", (), {"sample_size": 10**6},
        "unet/config.json: sample_size out of range: expected sample_size an integer in [1, 4096]; found 1000000."),
    "too_large_default_resolution": (
        "sd15", "unet/config.json", (), {"sample_size": 1024},
        "unet/config.json: sample_size too large: expected sample_size x 8 (the VAE's downsampling) at most 4096 "
        "pixels; found 1024 (8192 pixels)."),
    "absurd_text_positions": (
        "sd15", "text_encoder/config.json", (), {"max_position_embeddings": 10**9},
        "text_encoder/config.json: max_position_embeddings out of range: expected max_position_embeddings an "
        "integer in [1, 1024]; found 1000000000."),
    "absurd_text_layers": (
        "sdxl", "text_encoder_2/config.json", (), {"num_hidden_layers": 10**6},
        "text_encoder_2/config.json: num_hidden_layers out of range: expected num_hidden_layers an integer in "
        "[1, 64]; found 1000000."),
    "channels_given_as_text": (
        "sd15", "unet/config.json", (), {"in_channels": "4"},
        "unet/config.json: in_channels out of range: expected in_channels an integer in [1, 64]; found \"4\"."),
    "inpainting_unet": (
        "sd15", "unet/config.json", (), {"in_channels": 9},
        "unet/config.json: in_channels/out_channels do not fit the VAE: expected both equal to the VAE's "
        "latent_channels 4"),
    "sdxl_added_embedding_size": (
        "sdxl", "unet/config.json", (), {"projection_class_embeddings_input_dim": 81},
        "unet/config.json: projection_class_embeddings_input_dim does not fit: expected 80 (text_encoder_2's "
        "projection_dim 32 + 6 time ids x addition_time_embed_dim 8); found 81."),
    "down_block_types_do_not_fit": (
        "sd15", "unet/config.json", (), {"down_block_types": ["DownBlock2D"]},
        "unet/config.json: down_block_types does not fit block_out_channels: expected down_block_types a list of 2 "
        "names (one per entry of block_out_channels); found [\"DownBlock2D\"]."),
    "config_not_an_object": (
        "sd15", "vae/config.json", (), None, "vae/config.json: not a JSON object: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_before_loading_anything(exports, tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    family, file, drop, changes, message = BAD_CONFIGS[case]
    if changes is None:
        pipeline = tmp_path / "pipe"
        shutil.copytree(exports[family].pipeline, pipeline)
        (pipeline / file).write_text("[4, 8]")
    else:
        pipeline = edited_pipeline(exports, tmp_path, family, file, drop, **changes)
    monkeypatch.setattr(export_models, "_load_checked", _no_loading)
    monkeypatch.setattr(export_models, "_tokenizer", _no_loading)
    assert export_models.main(["--pipeline", str(pipeline), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert f"{pipeline}/{message}" in err if message.startswith(file) else message in err
    assert not (tmp_path / "out").exists()


def test_absurd_resolution_exits_2(exports, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(export_models, "_load_checked", _no_loading)
    args = ["--pipeline", str(exports["sd15"].pipeline), "--out", str(tmp_path / "out")]
    assert export_models.main([*args, "--resolution", "1000000"]) == 2
    assert "--resolution 1000000: expected a positive multiple of 8 up to 4096; found 1000000." in one_line_error(capsys)
    assert export_models.main([*args, "--resolution", "-8"]) == 2
    assert "--resolution -8: expected a positive multiple of 8" in one_line_error(capsys)


# (family, file, keys set, what the message must say): configs whose sizes do not fit the weights
UNFIT_CONFIGS = {
    "unet_layers_per_block": (
        "sd15", "unet/config.json", {"layers_per_block": 2},
        r"unet: cannot load the UNet with its config\.json: expected weights whose shapes match config\.json; "
        r"found size mismatch for \S+: copying a param with shape torch\.Size\(\[\d+\]\) from checkpoint, the shape "
        r"in current model is torch\.Size\(\[\d+\]\)\. \(and \d+ more\)\. Restore the sizes in \S+/unet/config\.json"),
    "vae_layers_per_block": (
        "sdxl", "vae/config.json", {"layers_per_block": 2},
        r"vae: (cannot load the VAE with its config\.json|the weights do not fit config\.json)"),
    "text_encoder_more_layers": (
        "sd15", "text_encoder/config.json", {"num_hidden_layers": 3},
        r"text_encoder: the weights do not fit config\.json: 16 weights missing from the weights: expected exactly "
        r"the weights config\.json describes; found text_model\.encoder\.layers\.2\.\S+, \S+, \S+ and 13 more\."),
    "text_encoder_fewer_layers": (
        "sdxl", "text_encoder_2/config.json", {"num_hidden_layers": 1},
        r"text_encoder_2: the weights do not fit config\.json: 16 weights unused"),
    "text_encoder_width": (
        "sdxl", "text_encoder/config.json", {"intermediate_size": 48},
        r"text_encoder: cannot load the text encoder with its config\.json: .*size mismatch"),
    "tokenizer_length": (
        "sd15", "tokenizer/tokenizer_config.json", {"model_max_length": 1000},
        r"tokenizer/tokenizer_config\.json: model_max_length does not fit the text encoder: expected a length in "
        r"\[1, 77\] \(text_encoder's max_position_embeddings\); found 1000\."),
}


@pytest.mark.parametrize("case", sorted(UNFIT_CONFIGS))
def test_config_that_does_not_fit_the_weights_exits_2(exports, tmp_path: Path, capsys, case: str) -> None:
    family, file, changes, pattern = UNFIT_CONFIGS[case]
    pipeline = edited_pipeline(exports, tmp_path, family, file, **changes)
    assert export_models.main(["--pipeline", str(pipeline), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert re.search(re.escape(str(pipeline)) + "/" + pattern, err), err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_config_cli_prints_one_line(exports, tmp_path: Path, run_cli) -> None:
    pipeline = edited_pipeline(exports, tmp_path, "sdxl", "unet/config.json", ("cross_attention_dim",))
    proc = run_cli("export_models", "--pipeline", str(pipeline), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"export_models: error: {pipeline}/unet/config.json: required key 'cross_attention_dim' is "
                           "missing: expected cross_attention_dim an integer in [1, 8192]; found no such key. "
                           "Add cross_attention_dim to that file, or use the complete diffusers pipeline folder the "
                           "weights came with.\n")


@pytest.mark.parametrize("removed", ["tokenizer_2/vocab.json", "unet/diffusion_pytorch_model.safetensors",
                                     "text_encoder_2/model.safetensors"])
def test_missing_file_exits_2_before_loading_anything(exports, tmp_path: Path, monkeypatch, capsys, removed: str) -> None:
    pipeline = tmp_path / "pipe"
    shutil.copytree(exports["sdxl"].pipeline, pipeline)
    (pipeline / removed).unlink()
    monkeypatch.setattr(export_models, "_load_checked", _no_loading)
    assert export_models.main(["--pipeline", str(pipeline), "--out", str(tmp_path / "out")]) == 2
    folder, name = removed.split("/")
    err = one_line_error(capsys)
    if name == "vocab.json":
        assert (f"{pipeline / folder}: not a CLIP tokenizer folder: expected vocab.json and merges.txt; "
                "found no vocab.json.") in err
    else:
        assert (f"{pipeline / folder}: no weights: expected a .safetensors (or .bin) weights file next to "
                "config.json; found none.") in err


def test_keys_the_libraries_default_may_be_absent(exports, tmp_path: Path) -> None:
    """check_configs requires only what the export reads or compares; the rest is checked when present."""
    pipeline = tmp_path / "pipe"
    shutil.copytree(exports["sdxl"].pipeline, pipeline)
    optional = {
        "unet/config.json": ["layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
                             "num_attention_heads", "transformer_layers_per_block"],
        "vae/config.json": ["in_channels", "out_channels", "layers_per_block"],
        "text_encoder_2/config.json": ["intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                       "eos_token_id"],
    }
    for file, keys in optional.items():
        data = json.loads((pipeline / file).read_text())
        (pipeline / file).write_text(json.dumps({k: v for k, v in data.items() if k not in keys}))
    export_models.check_configs(pipeline, "sdxl")  # no ExportError
