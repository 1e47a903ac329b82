"""Annotator models that score (image, prompt) pairs, loaded from local folders only.

- `pickscore`: transformers CLIPModel (yuvalkirstain/PickScore_v1) with the CLIPProcessor of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K; score = logit_scale.exp() * cos (PickScore's README).
- `hps`: open_clip ViT-H-14 with HPS_v2_compressed.pt; score = cos, as hpsv2's img_score.py
  computes it (diagonal of normalised image features @ text features; no factor 100).
- `clip`: open_clip ViT-H-14 with the laion2b weights; score = max(100 * cos, 0), the usual CLIP score.

The open_clip architecture is a name (`--hps-arch`, `--clip-arch`, default ViT-H-14); other
architectures (the tests' tiny one) are registered from a config JSON with
`--open-clip-config FILE.json` (open_clip's add_model_config), so every model goes through
the same loading code. Scores are computed in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from dde_tools.common import ToolError, first_nonfinite

__all__ = ["ToolError", "AnnotatorSpec", "check", "load", "probe", "add_arguments", "specs_from_args"]

KINDS = ("pickscore", "hps", "clip")
DEFAULT_OPEN_CLIP_ARCH = "ViT-H-14"
PICKSCORE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")
CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin")
HPS_WEIGHTS = ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt", "HPS_v2.pt")
LAYOUT_HINT = "see README.md, 'Evaluating and relabelling' for the folder layouts"


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ToolError("--device", "not a device name", "auto, cpu, cuda or cuda:N", repr(name),
                        "Pass one of those.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device", "no CUDA device is visible", "a GPU for --device cuda", "none",
                        "Use --device cpu or auto.")
    return device


def _existing(path: Path, role: str, expected: str, want_dir: bool) -> Path:
    path = Path(path)
    if not path.exists():
        raise ToolError(path, f"{role} does not exist", expected, "nothing at that path",
                        f"Pass the right path ({LAYOUT_HINT}).")
    if want_dir and not path.is_dir():
        raise ToolError(path, f"{role} is not a folder", expected, "a file", f"Pass the folder ({LAYOUT_HINT}).")
    return path


def _first_present(folder: Path, names: Sequence[str], role: str, expected: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:12]
    raise ToolError(folder, f"{role} has none of the expected files", expected, f"{found}",
                    f"Pass the folder that holds it ({LAYOUT_HINT}).")


class Annotator(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt) pair: float64 [N]."""


def _normalise(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


class PickScore:
    """PickScore_v1: logit_scale.exp() * cos(image_emb, text_emb), as its README computes it."""

    name = "pickscore"

    def __init__(self, model_dir: Path, processor_dir: Path, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        model_dir, processor_dir = _check_pickscore_dirs(model_dir, processor_dir)
        try:
            # The slow (PIL) image processor is the one PickScore's README ran with.
            self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True, use_fast=False)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ToolError(processor_dir, "cannot load a CLIPProcessor", "a transformers CLIPProcessor folder",
                            f"{type(err).__name__}: {err}"[:300], f"Pass --pickscore-processor the laion "
                            f"CLIP-ViT-H-14 folder ({LAYOUT_HINT}).") from err
        try:
            model, info = CLIPModel.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise ToolError(model_dir, "cannot load a CLIPModel", "a transformers CLIPModel folder",
                            f"{type(err).__name__}: {err}"[:300],
                            "Pass --pickscore-model the PickScore_v1 folder.") from err
        if info["missing_keys"]:
            raise ToolError(model_dir, "weights do not cover the CLIPModel", "every CLIPModel weight",
                            f"{len(info['missing_keys'])} missing, e.g. {info['missing_keys'][:3]}",
                            "Pass --pickscore-model the PickScore_v1 folder.")
        _check_processor_fits(self.processor, model, processor_dir)
        _check_finite(model, model_dir)
        self.model, self.device = model.eval().to(device), device

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        image_inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        text_inputs = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                                     return_tensors="pt").to(self.device)
        image_embs = _normalise(self.model.get_image_features(**image_inputs))
        text_embs = _normalise(self.model.get_text_features(**text_inputs))
        scores = self.model.logit_scale.exp() * (image_embs * text_embs).sum(-1)
        return scores.double().cpu().numpy()


def _check_finite(model: torch.nn.Module, path: Path) -> None:
    bad = first_nonfinite(model)
    if bad:
        raise ToolError(path, "non-finite weights", "finite values", f"{bad[0]} holds {bad[1]} NaN or Inf values",
                        "The file is damaged: use the original annotator files.")


def _check_pickscore_dirs(model_dir: Path, processor_dir: Path) -> tuple[Path, Path]:
    model_expected = "a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)"
    model_dir = _existing(model_dir, "--pickscore-model", model_expected, want_dir=True)
    config = _first_present(model_dir, ("config.json",), "--pickscore-model", model_expected)
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ToolError(config, "not a JSON object", model_expected, f"{type(err).__name__}: {err}"[:200],
                        "Pass --pickscore-model the PickScore_v1 folder (copy it again).") from err
    if model_type != "clip":
        raise ToolError(config, "not a CLIPModel config", "model_type 'clip'", repr(model_type),
                        "Pass --pickscore-model the PickScore_v1 folder.")
    _first_present(model_dir, PICKSCORE_WEIGHTS, "--pickscore-model", f"weights: one of {PICKSCORE_WEIGHTS}")
    processor_expected = "a CLIPProcessor folder (preprocessor_config.json + tokenizer files)"
    processor_dir = _existing(processor_dir, "--pickscore-processor", processor_expected, want_dir=True)
    _first_present(processor_dir, ("preprocessor_config.json",), "--pickscore-processor", processor_expected)
    _first_present(processor_dir, ("tokenizer.json", "vocab.json"), "--pickscore-processor", processor_expected)
    return model_dir, processor_dir


def _check_processor_fits(processor, model, processor_dir: Path) -> None:
    """The processor's image size and vocabulary must be the model's."""
    crop = processor.image_processor.crop_size
    crop = crop["height"] if isinstance(crop, dict) else crop
    if crop != model.config.vision_config.image_size:
        raise ToolError(processor_dir, "image size does not match --pickscore-model", f"crop size "
                        f"{model.config.vision_config.image_size}", str(crop), "Pass the model's processor folder.")
    if len(processor.tokenizer) > model.config.text_config.vocab_size:
        raise ToolError(processor_dir, "vocabulary larger than --pickscore-model's", f"at most "
                        f"{model.config.text_config.vocab_size} tokens", str(len(processor.tokenizer)),
                        "Pass the model's processor folder.")


class OpenClipScore:
    """HPSv2 (`hps`: cos) or CLIP score (`clip`: max(100 cos, 0)) on an open_clip model."""

    def __init__(self, name: str, weights: Path, arch: str, device: torch.device) -> None:
        import open_clip

        self.name = name
        path = _check_open_clip(name, weights, arch)
        check_architecture(name, path, arch)  # before allocating a model of the wrong size
        logging.disable(logging.WARNING)  # open_clip warns "no pretrained weights loaded": they come next
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        try:
            open_clip.load_checkpoint(model, str(path))
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise _unreadable(path, err) from err
            raise ToolError(path, f"weights do not match the open_clip architecture {arch}", f"the tensors of "
                            f"{arch}", str(err).replace("\n", " ")[:300], f"Pass --{name}-arch the architecture "
                            "these weights were trained with.") from err
        except Exception as err:  # torch.load / safetensors raise many types on a bad file
            raise _unreadable(path, err) from err
        _check_finite(model, path)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.model, self.device = model.eval().to(device), device

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        text = self.tokenizer(list(prompts)).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(text, normalize=True)
        cos = (image_features * text_features).sum(-1).double().cpu().numpy()
        return cos if self.name == "hps" else np.maximum(100.0 * cos, 0.0)


def _check_open_clip(name: str, weights: Path, arch: str) -> Path:
    """The weights file, once the architecture is known to open_clip."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ToolError(f"--{name}-arch", f"unknown open_clip architecture {arch!r}", "a built-in name such "
                        f"as {DEFAULT_OPEN_CLIP_ARCH} or one registered with --open-clip-config FILE.json",
                        f"{len(open_clip.list_models())} known names", "Fix the name or register its config.")
    return _open_clip_weights(name, weights)


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an open_clip weights file, read lazily (safetensors header, or a
    memory-mapped torch checkpoint); a `state_dict` wrapper and DDP `module.` prefixes removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as file:
                return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:  # torch.load / safetensors raise many types on a bad file
        raise _unreadable(path, err) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _unreadable(path, TypeError(f"holds a {type(state).__name__}, not a state dict"))
    return {key.removeprefix("module."): tuple(value.shape) for key, value in state.items()
            if isinstance(value, torch.Tensor)}


def check_architecture(name: str, path: Path, arch: str) -> None:
    """Refuse weights that are not of `arch`, comparing tensor shapes with the architecture built on
    the meta device (no memory): a wrong --hps-arch / --clip-arch is named before a full-size
    random model is allocated. Only clear mismatches are refused (open_clip converts a few names)."""
    import open_clip

    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):  # the default device too: nothing is initialised on the CPU first
            model = open_clip.create_model(arch, pretrained=None, device="meta")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as err:  # an architecture whose config open_clip cannot build
        raise ToolError(f"--{name}-arch", f"open_clip cannot build the architecture {arch!r}", "a buildable config",
                        f"{type(err).__name__}: {err}"[:300], "Fix its config (--open-clip-config).") from err
    finally:
        logging.disable(logging.NOTSET)
    found = _weight_shapes(path)
    ignore = {"logit_scale", "logit_bias", "text.transformer.embeddings.position_ids"}
    differ = [k for k in expected if k in found and k not in ignore and found[k] != expected[k]]
    missing = [k for k in expected if k not in found and k not in ignore]
    if differ or len(missing) > len(expected) // 10:
        example = (f"{differ[0]} is {list(found[differ[0]])} in the file, {list(expected[differ[0]])} in {arch}"
                   if differ else f"{len(missing)} of {arch}'s {len(expected)} tensors are absent, e.g. {missing[0]}")
        raise ToolError(f"--{name}-arch {arch}", "the weights are not of this open_clip architecture",
                        f"the tensors of {arch} in {path}", f"{len(differ)} shapes differ, {len(missing)} tensors "
                        f"missing ({example})", f"Pass --{name}-arch the architecture these weights were trained "
                        f"with (default {DEFAULT_OPEN_CLIP_ARCH}; register others with --open-clip-config FILE.json).")


def _unreadable(path: Path, err: Exception) -> ToolError:
    return ToolError(path, "not a readable weights file", "a torch checkpoint or safetensors file",
                     f"{type(err).__name__}: {err}"[:300], "Pass the original (complete) file.")


def _open_clip_weights(name: str, weights: Path) -> Path:
    """The weights file: `weights` itself, or the expected file inside the folder `weights`."""
    names = HPS_WEIGHTS if name == "hps" else CLIP_WEIGHTS
    flag = "--hps-checkpoint" if name == "hps" else "--clip-weights"
    weights = _existing(weights, flag, f"a file or a folder holding one of {names}", want_dir=False)
    return _first_present(weights, names, flag, f"one of {names}") if weights.is_dir() else weights


def register_open_clip_configs(paths: Sequence[Path]) -> None:
    """Register extra open_clip architectures; each file's stem becomes an architecture name."""
    import open_clip

    for path in paths:
        expected = "an open_clip model config JSON with embed_dim, vision_cfg and text_cfg"
        path = _existing(Path(path), "--open-clip-config", expected, want_dir=False)
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ToolError(path, "not JSON", expected, str(err), "Pass the config file.") from err
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise ToolError(path, "not an open_clip model config", expected, f"missing keys {missing}",
                            "Pass the config file.")
        open_clip.add_model_config(path)


@dataclass
class AnnotatorSpec:
    """Where one annotator's files are, from the command line."""

    name: str
    path: Path
    processor: Path | None = None
    arch: str = DEFAULT_OPEN_CLIP_ARCH


def check(spec: AnnotatorSpec) -> None:
    """The file checks of `load` and the architecture against the weights' tensor shapes, without
    loading weights (so a long job can fail early)."""
    if spec.name == "pickscore":
        _check_pickscore_dirs(spec.path, spec.processor)
    else:
        check_architecture(spec.name, _check_open_clip(spec.name, spec.path, spec.arch), spec.arch)


def load(spec: AnnotatorSpec, device: torch.device) -> Annotator:
    if spec.name == "pickscore":
        return PickScore(spec.path, spec.processor, device)
    return OpenClipScore(spec.name, spec.path, spec.arch, device)


def probe_image(size: int = 64) -> Image.Image:
    """A deterministic test image: a colour gradient."""
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((size, size), 128.0)), axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def probe(spec: AnnotatorSpec, device: torch.device) -> float:
    """Load the annotator and score one test image: every file, architecture and device problem shows
    here, before any sampling. Returns the score; the model is freed again."""
    annotator = load(spec, device)
    try:
        scores = np.asarray(annotator.score([probe_image()], ["a photo of a cat"]), dtype=np.float64)
    except (RuntimeError, ValueError) as err:
        raise ToolError(spec.path, f"the {spec.name} annotator fails on a test image", "a score",
                        f"{type(err).__name__}: {err}"[:300], "Check the annotator's files and flags.") from err
    finally:
        del annotator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if scores.shape != (1,) or not np.isfinite(scores).all():
        raise ToolError(spec.path, f"the {spec.name} annotator gives no finite score on a test image",
                        "one finite number", str(scores.tolist())[:100], "Its weights are damaged: use the "
                        "original files.")
    return float(scores[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags naming annotator files, shared by evaluate and relabel."""
    group = parser.add_argument_group("annotators (local files; see README.md for the layouts)")
    group.add_argument("--pickscore-model", type=Path, help="PickScore_v1 folder (transformers CLIPModel)")
    group.add_argument("--pickscore-processor", type=Path,
                       help="CLIPProcessor folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    group.add_argument("--hps-checkpoint", type=Path, help="HPS_v2_compressed.pt, or a folder holding it")
    group.add_argument("--clip-weights", type=Path,
                       help="open_clip weights file, or a folder holding open_clip_model.safetensors "
                            "or open_clip_pytorch_model.bin")
    group.add_argument("--hps-arch", default=DEFAULT_OPEN_CLIP_ARCH, help="open_clip architecture of HPS")
    group.add_argument("--clip-arch", default=DEFAULT_OPEN_CLIP_ARCH, help="open_clip architecture of CLIP")
    group.add_argument("--open-clip-config", type=Path, action="append", default=[],
                       help="register an open_clip architecture from its config JSON (name = file stem)")
    group.add_argument("--score-batch-size", type=int, default=32, help="images per annotator forward")


def specs_from_args(args: argparse.Namespace) -> list[AnnotatorSpec]:
    """One spec per annotator whose files were named, in KINDS order."""
    if (args.pickscore_model is None) != (args.pickscore_processor is None):
        raise ToolError("--pickscore-model/--pickscore-processor", "PickScore needs both folders",
                        "both flags", "only one", "Pass the PickScore_v1 folder and the laion processor folder.")
    if args.score_batch_size < 1:
        raise ToolError("--score-batch-size", "out of range", ">= 1", str(args.score_batch_size), "Pass >= 1.")
    register_open_clip_configs(args.open_clip_config)
    specs = []
    if args.pickscore_model is not None:
        specs.append(AnnotatorSpec("pickscore", args.pickscore_model, args.pickscore_processor))
    if args.hps_checkpoint is not None:
        specs.append(AnnotatorSpec("hps", args.hps_checkpoint, arch=args.hps_arch))
    if args.clip_weights is not None:
        specs.append(AnnotatorSpec("clip", args.clip_weights, arch=args.clip_arch))
    return specs


def batches(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))
