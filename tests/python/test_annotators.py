"""Tests of dde_tools.annotators: scores against each library's own computation, every file format, errors."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from dde_tools import annotators as ann
from dde_tools.annotator_fixtures import TINY_ARCH, TINY_OPEN_CLIP_CONFIG
from dde_tools.annotators import ToolError

CPU = torch.device("cpu")
PROMPTS = ["a red cat", "two golden trees on the moon, oil painting", "x",
           " ".join(["a giant glowing dragon at sunset"] * 20),  # longer than 77 tokens
           "Neon city"]


def images() -> list[Image.Image]:
    """Five images of different sizes and modes (RGBA and L are converted by the processors)."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 48), (40, 96), (33, 33), (128, 100)]
    result = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    result[1] = result[1].convert("RGBA")
    result[3] = result[3].convert("L")
    return result


def parse(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ann.add_arguments(parser)
    return parser.parse_args(flags)


def pickscore_reference(model_dir: Path, processor_dir: Path) -> np.ndarray:
    """PickScore's README, one image at a time."""
    processor = AutoProcessor.from_pretrained(processor_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images(), PROMPTS):
            image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0])[0].item())
    return np.array(scores)


def open_clip_cosines(weights_file: Path) -> np.ndarray:
    """hpsv2's img_score: open_clip's own loader, forward (output_dict), diag(image @ text.T), one image at a time."""
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(weights_file),
                                                                     output_dict=True)
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    model.eval()
    cosines = []
    with torch.no_grad():
        for image, prompt in zip(images(), PROMPTS):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits = outputs["image_features"] @ outputs["text_features"].T
            cosines.append(torch.diagonal(logits)[0].item())
    return np.array(cosines)


@pytest.mark.parametrize("name", ["pickscore", "hps", "clip", "clip_bin"])
def test_scores_match_the_libraries_own_computation(name: str, tiny_annotators, annotator_flags) -> None:
    specs = ann.specs_from_args(parse(annotator_flags[name]))
    assert len(specs) == 1
    annotator = ann.load(specs[0], CPU)
    batched = annotator.score(images(), PROMPTS)
    assert batched.dtype == np.float64 and batched.shape == (5,)
    if name == "pickscore":
        expected = pickscore_reference(tiny_annotators["pickscore_model"], tiny_annotators["pickscore_processor"])
    elif name == "hps":
        expected = open_clip_cosines(tiny_annotators["hps"])
    else:
        weights = tiny_annotators[name] / ("open_clip_model.safetensors" if name == "clip"
                                           else "open_clip_pytorch_model.bin")
        expected = np.maximum(100.0 * open_clip_cosines(weights), 0.0)
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.ptp(batched) > 0  # the images and prompts are told apart


def test_clip_score_is_clipped_at_zero(annotator_flags, tiny_annotators) -> None:
    cosines = open_clip_cosines(tiny_annotators["clip"] / "open_clip_model.safetensors")
    scores = ann.load(ann.specs_from_args(parse(annotator_flags["clip"]))[0], CPU).score(images(), PROMPTS)
    assert (scores >= 0).all()
    np.testing.assert_allclose(scores[cosines > 0], 100 * cosines[cosines > 0], rtol=1e-4)


def test_the_default_architecture_is_vit_h_14() -> None:
    args = parse(["--hps-checkpoint", "h.pt", "--clip-weights", "c"])
    assert (args.hps_arch, args.clip_arch) == ("ViT-H-14", "ViT-H-14") == (ann.DEFAULT_OPEN_CLIP_ARCH,) * 2
    assert [s.arch for s in ann.specs_from_args(args)] == ["ViT-H-14", "ViT-H-14"]
    assert "ViT-H-14" in open_clip.list_models()


def expect_error(call, *fragments: str) -> str:
    with pytest.raises(ToolError) as info:
        call()
    message = str(info.value)
    for fragment in (*fragments, "expected", "found"):
        assert fragment in message, message
    return message


def load_flags(flags: list[str]):
    return lambda: [ann.load(s, CPU) for s in ann.specs_from_args(parse(flags))]


def test_missing_or_wrong_pickscore_folders(tiny_annotators, tmp_path: Path) -> None:
    model, processor = str(tiny_annotators["pickscore_model"]), str(tiny_annotators["pickscore_processor"])
    missing = str(tmp_path / "nope")
    expect_error(load_flags(["--pickscore-model", missing, "--pickscore-processor", processor]),
                 missing, "--pickscore-model does not exist")
    expect_error(load_flags(["--pickscore-model", processor, "--pickscore-processor", processor]),
                 processor, "--pickscore-model has none of the expected files", "config.json")
    expect_error(load_flags(["--pickscore-model", model, "--pickscore-processor", model]),
                 model, "preprocessor_config.json")
    expect_error(load_flags(["--pickscore-model", model]), "PickScore needs both folders")
    text_only = tmp_path / "text_model"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    expect_error(load_flags(["--pickscore-model", str(text_only), "--pickscore-processor", processor]),
                 "not a CLIPModel config", "'clip_text_model'")


def test_missing_or_wrong_open_clip_files(tiny_annotators, annotator_flags, tmp_path: Path) -> None:
    register = ["--open-clip-config", str(tiny_annotators["open_clip_config"])]
    tiny = ["--hps-arch", TINY_ARCH, "--clip-arch", TINY_ARCH, *register]
    expect_error(load_flags(["--hps-checkpoint", str(tmp_path / "HPS_v2_compressed.pt"), *tiny]),
                 "HPS_v2_compressed.pt", "--hps-checkpoint does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(load_flags(["--clip-weights", str(empty), *tiny]), str(empty), "open_clip_model.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    expect_error(load_flags(["--hps-checkpoint", str(garbage), *tiny]), str(garbage), "not a readable weights file")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_annotators["hps"].read_bytes()[:5000])
    expect_error(load_flags(["--hps-checkpoint", str(truncated), *tiny]), "not a readable weights file")
    expect_error(load_flags(["--clip-weights", str(tiny_annotators["clip"]), "--clip-arch", "ViT-Q-99"]),
                 "unknown open_clip architecture 'ViT-Q-99'", "--open-clip-config")
    wide = tmp_path / "dde-tiny-ViT-wide.json"
    wide.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG | {"embed_dim": 24}))
    expect_error(load_flags(["--hps-checkpoint", str(tiny_annotators["hps"]), "--hps-arch", wide.stem,
                             "--open-clip-config", str(wide)]),
                 "--hps-arch dde-tiny-ViT-wide: the weights are not of this open_clip architecture",
                 "shapes differ", "Pass --hps-arch")


def test_a_wrong_architecture_is_named_without_building_it(tiny_annotators, monkeypatch) -> None:
    """The tiny weights under the default ViT-H-14: refused from the tensor shapes on the meta device,
    by check() and by load(), before a ~1e9-parameter random model could be allocated."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    start = time.perf_counter()
    for flags in (["--hps-checkpoint", str(tiny_annotators["hps"])], ["--clip-weights", str(tiny_annotators["clip"])],
                  ["--clip-weights", str(tiny_annotators["clip_bin"])]):
        spec = ann.specs_from_args(parse(flags))[0]
        for call in (lambda: ann.check(spec), lambda: ann.load(spec, CPU)):
            expect_error(call, f"--{spec.name}-arch ViT-H-14: the weights are not of this open_clip architecture",
                         "shapes differ", "positional_embedding is [77, 32] in the file, [77, 1024] in ViT-H-14")
    assert time.perf_counter() - start < 30  # 6 checks in ~3 s; initialising ViT-H-14 on the CPU takes ~15 s each


def test_probe_scores_a_test_image_and_refuses_non_finite_weights(tiny_annotators, annotator_flags,
                                                                  tmp_path: Path) -> None:
    for name in ("pickscore", "hps", "clip"):
        spec = ann.specs_from_args(parse(annotator_flags[name]))[0]
        assert np.isfinite(ann.probe(spec, CPU))
    state = torch.load(tiny_annotators["hps"], weights_only=True)
    state["state_dict"]["visual.proj"][0, 0] = float("nan")
    broken = tmp_path / "HPS_v2_compressed.pt"
    torch.save(state, broken)
    flags = annotator_flags["hps"].copy()
    flags[1] = str(broken)
    expect_error(lambda: ann.probe(ann.specs_from_args(parse(flags))[0], CPU), str(broken), "non-finite weights",
                 "visual.proj holds 1 NaN or Inf values")


def test_bad_open_clip_config(tmp_path: Path) -> None:
    not_json = tmp_path / "a.json"
    not_json.write_text("{")
    expect_error(lambda: ann.register_open_clip_configs([not_json]), str(not_json), "not JSON")
    not_config = tmp_path / "b.json"
    not_config.write_text("{}")
    expect_error(lambda: ann.register_open_clip_configs([not_config]), "missing keys ['embed_dim'")
    expect_error(lambda: ann.register_open_clip_configs([tmp_path / "c.json"]), "does not exist")
