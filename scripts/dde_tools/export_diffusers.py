"""Write a dde_train checkpoint back as diffusers folders.

    python -m dde_tools.export_diffusers --checkpoint CHECKPOINT --out OUT [--pipeline SRC]

CHECKPOINT is a step folder (RUN/checkpoints/step-NNNNNNNN), or the run folder RUN (also
RUN/checkpoints, RUN/latest, RUN/checkpoints/latest): then the newest complete step is exported
and named. A checkpoint's ``unet/`` is already in diffusers layout (``config.json`` plus
``diffusion_pytorch_model.safetensors`` under diffusers' state-dict names). This tool checks it
(complete checkpoint; a config within sane sizes whose tensors match the weights file's header,
checked before anything is allocated; every value finite), writes ``OUT/unet`` and, with
``--pipeline``, a whole pipeline folder: ``model_index.json`` and the component folders it names
(the trained UNet in place of SRC's; other files of SRC, such as single-file checkpoints, are not
copied, nor duplicate weight formats inside a component), loadable by
``DiffusionPipeline.from_pretrained(OUT)``.

OUT is written as a staging folder next to it and renamed into place when complete; an existing
OUT must be an earlier export_diffusers output (common.MARKER) or empty: a run folder, a
checkpoint, a source pipeline or any other folder is refused, never overwritten.
Exit codes: 0 done, 1 a write failed (disk full, file too large), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dde_tools.common import InputError, StagedOutput, ToolError, check_output, run_main, writing

TOOL = "export_diffusers"
WEIGHTS = "diffusion_pytorch_model.safetensors"
STEP_PATTERN = re.compile(r"step-(\d+)")
COMPONENT_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Weight formats a PyTorch diffusers pipeline does not load.
SKIPPED_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".h5", ".tflite", ".ckpt")
TORCH_PICKLES = (".bin", ".pt", ".pth")
# Sane bounds of a UNet config, far above SD1.5 / SDXL (checked before the model is built).
UNET_LIMITS = {
    "in_channels": 64, "out_channels": 64, "block_out_channels": 8192, "layers_per_block": 32,
    "cross_attention_dim": 16384, "attention_head_dim": 4096, "num_attention_heads": 4096,
    "transformer_layers_per_block": 128, "sample_size": 4096, "norm_num_groups": 8192,
    "projection_class_embeddings_input_dim": 65536, "addition_time_embed_dim": 16384,
    "time_embedding_dim": 65536, "encoder_hid_dim": 16384,
}
MAX_BLOCKS = 16
MAX_PARAMETERS = 20_000_000_000  # 80 GB in fp32; SDXL's UNet has 2.6e9
# Config keys the trained UNet must share with the pipeline's own UNet.
FIT_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "block_out_channels")


class ExportError(InputError):
    """A checkpoint or pipeline that cannot be exported; the message says what and where."""


# ----------------------------------------------------------------------------------------------
# Which checkpoint

def _step_of(folder: Path) -> int | None:
    match = STEP_PATTERN.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def newest_complete(checkpoints: Path) -> Path:
    """The complete step-N folder with the largest N (what dde_train --resume takes)."""
    steps = sorted((s, p) for p in checkpoints.iterdir() if (s := _step_of(p)) is not None and p.is_dir())
    complete = [p for _, p in steps if (p / "COMPLETE").is_file()]
    if not complete:
        raise ToolError(checkpoints, "no complete checkpoint", "a step-NNNNNNNN folder holding COMPLETE",
                        f"{len(steps)} step folders, none complete", "Export once the run has written a "
                        "checkpoint (checkpoint.every), or pass a step folder.")
    return complete[-1]


def resolve_checkpoint(given: Path) -> tuple[Path, str]:
    """(step folder, how it was chosen) for --checkpoint: a step folder, RUN, RUN/checkpoints,
    RUN/latest or RUN/checkpoints/latest."""
    given = Path(given)
    if given.name == "latest" and not os.path.lexists(given):
        base = given.parent.parent if given.parent.name == "checkpoints" else given.parent
        if (base / "checkpoints").is_dir():
            return newest_complete(base / "checkpoints"), f"the newest complete step of {base}"
    if not given.exists():
        raise ToolError(given, "--checkpoint does not exist", "RUN/checkpoints/step-NNNNNNNN or a run folder RUN",
                        "nothing at that path" if not os.path.islink(given) else "a dangling link",
                        "Pass the run folder or one of its step folders.")
    if not given.is_dir():
        raise ToolError(given, "--checkpoint is not a folder", "RUN/checkpoints/step-NNNNNNNN or a run folder RUN",
                        "a file", "Pass the run folder or one of its step folders.")
    if (given / "COMPLETE").exists() or (given / "unet").is_dir() or (given / "trainer_state.json").exists():
        return given, "as given"
    if (given / "checkpoints").is_dir():
        return newest_complete(given / "checkpoints"), f"the newest complete step of {given}"
    if given.name == "checkpoints" or any(_step_of(p) is not None for p in given.iterdir()):
        return newest_complete(given), f"the newest complete step of {given.parent}"
    raise ToolError(given, "--checkpoint is neither a checkpoint nor a run folder", "a step folder (COMPLETE, "
                    "unet/) or a run folder (checkpoints/)", "neither", "Pass RUN or RUN/checkpoints/step-NNNNNNNN.")


def check_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint's unet folder, after checking it is complete."""
    if not (checkpoint / "COMPLETE").is_file():
        raise ExportError(f"{checkpoint}: no COMPLETE marker: not a finished checkpoint (pick another step-* directory)")
    unet_dir = checkpoint / "unet"
    for name in ("config.json", WEIGHTS):
        if not (unet_dir / name).is_file():
            raise ExportError(f"{unet_dir / name}: missing from the checkpoint")
    return unet_dir


# ----------------------------------------------------------------------------------------------
# The UNet: config limits, header shapes, then the weights

def _numbers(value: Any) -> list[Any]:
    """The leaves of an int / list / nested list config value."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _numbers(item)]
    return [value]


def check_unet_config(config: dict, path: Path) -> None:
    """Refuse sizes that would allocate absurd amounts before any model is built."""
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS):
            raise ExportError(f"{path}: {key} is {str(value)[:80]}: expected a list of 1 to {MAX_BLOCKS} entries "
                              "(the checkpoint's config is damaged: export another step-* directory)")
    for key, limit in UNET_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        for leaf in _numbers(value):
            if isinstance(leaf, bool) or not isinstance(leaf, (int, float)) or not 0 <= leaf <= limit:
                raise ExportError(f"{path}: {key} is {str(value)[:80]}: expected numbers in 0..{limit} (SDXL's are "
                                  "far below); the config is damaged or not a Stable Diffusion UNet: export another "
                                  "step-* directory")


def _header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{weights}: not a readable safetensors file ({error}); "
                          "the checkpoint is damaged: export another step-* directory") from error
    return shapes


def unet_config(unet_dir: Path) -> dict:
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(unet_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"{unet_dir / 'config.json'}: not a readable diffusers UNet config ({error})") from error
    if not isinstance(config, dict):
        raise ExportError(f"{unet_dir / 'config.json'}: not a readable diffusers UNet config (not a JSON object)")
    check_unet_config(config, unet_dir / "config.json")
    return config


def check_unet(unet_dir: Path) -> dict:
    """The UNet config, once its sizes are sane and its tensors those of the weights file's header.
    The model is built on the meta device: nothing is allocated."""
    import torch
    from diffusers import UNet2DConditionModel

    config = unet_config(unet_dir)
    try:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
    except Exception as error:  # diffusers raises many types for an inconsistent config
        raise ExportError(f"{unet_dir / 'config.json'}: diffusers cannot build a UNet from this config "
                          f"({type(error).__name__}: {error})"[:400]) from error
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    parameters = sum(t.numel() for t in model.state_dict().values())
    if parameters > MAX_PARAMETERS:
        raise ExportError(f"{unet_dir / 'config.json'}: the config describes {parameters:.3g} parameters, more than "
                          f"{MAX_PARAMETERS:.3g}: the config is damaged (export another step-* directory)")
    shapes = _header_shapes(unet_dir / WEIGHTS)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{unet_dir / WEIGHTS}: tensor names do not match the UNet config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ExportError(f"{unet_dir / WEIGHTS}: {name} has shape {shape}, the config expects {expected[name]}")
    return config


def load_unet(unet_dir: Path):
    """Loads the UNet strictly: every parameter of the config must come from the file, shapes equal,
    values finite (a NaN or Inf weight would make every image of the exported pipeline NaN)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = check_unet(unet_dir)
    model = UNet2DConditionModel.from_config(config)
    try:
        state = load_file(unet_dir / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{unet_dir / WEIGHTS}: not a readable safetensors file ({error}); "
                          "the checkpoint is damaged: export another step-* directory") from error
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{unet_dir / WEIGHTS}: {name} holds non-finite values (NaN or Inf): "
                              "the checkpoint is damaged: export another step-* directory")
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The source pipeline

def read_model_index(pipeline: Path) -> dict:
    index_path = pipeline / "model_index.json"
    if not pipeline.is_dir():
        raise ToolError(pipeline, "--pipeline is not a folder", "a diffusers pipeline folder (model_index.json)",
                        "a file" if pipeline.exists() else "nothing at that path", "Pass the pipeline folder.")
    if not index_path.is_file():
        raise ExportError(f"{pipeline}: no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ToolError(index_path, "not valid JSON", "a diffusers model_index.json", f"{err}"[:200],
                        "Copy the pipeline folder again.") from err
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ToolError(index_path, "not a diffusers model index", "a JSON object with _class_name",
                        type(index).__name__ if not isinstance(index, dict) else "no _class_name",
                        "Copy the pipeline folder again.")
    return index


def pipeline_components(pipeline: Path) -> list[str]:
    """The component folders model_index.json names (those with a library and a class), checked."""
    index = read_model_index(pipeline)
    names = []
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        if not COMPONENT_PATTERN.fullmatch(key) or key in (".", ".."):
            raise ToolError(pipeline / "model_index.json", f"component name {key!r} is not a folder name",
                            "letters, digits, '_', '.', '-'", repr(key), "Fix the pipeline's model_index.json.")
        if key != "unet" and not (pipeline / key).is_dir():
            raise ToolError(pipeline / key, "a component folder model_index.json names is missing", "a folder",
                            "a file" if os.path.lexists(pipeline / key) else "nothing", "Copy the pipeline again.")
        names.append(key)
    if "unet" not in names:
        raise ToolError(pipeline / "model_index.json", "names no unet component", "a Stable Diffusion pipeline "
                        "(unet, vae, text_encoder, tokenizer, scheduler)", str(names), "Pass an SD1.5 or SDXL "
                        "pipeline folder.")
    return names


def check_fit(config: dict, pipeline: Path) -> None:
    """The trained UNet must be a drop-in for the pipeline's own (same inputs and conditioning)."""
    own = pipeline / "unet" / "config.json"
    if not own.is_file():
        return
    try:
        theirs = json.loads(own.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ToolError(own, "not valid JSON", "a diffusers UNet config", f"{err}"[:200],
                        "Copy the pipeline folder again.") from err
    differ = [k for k in FIT_KEYS if isinstance(theirs, dict) and k in theirs and theirs.get(k) != config.get(k)]
    if differ:
        key = differ[0]
        raise ToolError(pipeline, "the checkpoint's UNet does not fit this pipeline",
                        f"{key} = {theirs[key]} (the pipeline's UNet)", f"{config.get(key)} in the checkpoint",
                        "Pass the pipeline the run was exported from (export_models --pipeline).")


def _is_variant(name: str) -> bool:
    """diffusion_pytorch_model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, ...: a
    weights file of a dtype variant (loaded only with variant=...)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] in ("safetensors", "bin", "json") and \
        re.fullmatch(r"(fp16|bf16|fp32|non_ema|ema|no_ema)(-\d{5}-of-\d{5})?", parts[1]) is not None


def component_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to copy, files skipped) of one component folder: what diffusers loads, without flax /
    ONNX weights, without dtype variants, and without .bin pickles where safetensors exist."""
    entries = sorted(folder.iterdir())
    names = [p.name for p in entries]
    has_safetensors = any(n.endswith(".safetensors") and not _is_variant(n) for n in names)
    keep, skipped = [], []
    for path in entries:
        name = path.name
        if name.endswith(SKIPPED_SUFFIXES) or _is_variant(name) or \
                (has_safetensors and (name.endswith(TORCH_PICKLES) or name.endswith(".bin.index.json"))):
            skipped.append(path)
        else:
            keep.append(path)
    return keep, skipped


def copy_component(source: Path, target: Path) -> tuple[int, int]:
    """Copy one component folder (links followed); returns (bytes copied, bytes skipped)."""
    target.mkdir()
    copied = skipped_bytes = 0
    keep, skipped = component_files(source)
    for path in skipped:
        skipped_bytes += path.stat().st_size if path.is_file() else 0
    for path in keep:
        try:
            info = path.stat()
        except OSError as err:  # a dangling link or a loop in the source
            raise ToolError(path, "cannot read a file of the source pipeline", "a readable file or folder",
                            f"{err.strerror}", "Repair the pipeline folder (a broken link?).") from err
        if path.is_dir():
            sub = copy_component(path, target / path.name)
            copied, skipped_bytes = copied + sub[0], skipped_bytes + sub[1]
        else:
            with writing(target / path.name):
                shutil.copyfile(path, target / path.name)
            copied += info.st_size
    return copied, skipped_bytes


# ----------------------------------------------------------------------------------------------

def _legacy_output(folder: Path) -> bool:
    """An export written before the output marker existed."""
    return (folder / "dde_export.json").is_file()


def _legacy_patterns(folder: Path) -> list[str]:
    names = ["dde_export.json", "model_index.json", "unet"]
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        names += [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    except (OSError, ValueError, AttributeError):
        pass
    return names


def export(checkpoint: Path, out: Path, pipeline: Path | None = None, log=print) -> Path:
    """Writes OUT/unet (and the rest of the pipeline when ``pipeline`` is given); returns OUT."""
    step_dir, chosen = resolve_checkpoint(Path(checkpoint))
    if chosen != "as given":
        log(f"{TOOL}: exporting {step_dir} ({chosen})")
    unet_dir = check_checkpoint(step_dir)
    config = check_unet(unet_dir)
    components = []
    if pipeline is not None:
        pipeline = Path(pipeline)
        components = pipeline_components(pipeline)
        check_fit(config, pipeline)
    sources = [step_dir] + ([pipeline] if pipeline is not None else [])
    real_out = check_output(TOOL, Path(out), inputs=sources, no_write_inside=sources,
                            own_patterns=_legacy_patterns(Path(out)) if _legacy_output(Path(out)) else (),
                            legacy=_legacy_output)
    unet = load_unet(unet_dir)
    import torch

    with StagedOutput(TOOL, real_out) as staging:
        copied = skipped = 0
        if pipeline is not None:
            with writing(staging.folder / "model_index.json"):
                shutil.copyfile(pipeline / "model_index.json", staging.folder / "model_index.json")
            for name in components:
                if name != "unet":
                    done = copy_component(pipeline / name, staging.folder / name)
                    copied, skipped = copied + done[0], skipped + done[1]
        with writing(staging.folder / "unet" / WEIGHTS):
            unet.save_pretrained(staging.folder / "unet", safe_serialization=True)
        info = {"checkpoint": str(step_dir.resolve()), "step": _step_of(step_dir), "chosen": chosen,
                "pipeline": str(pipeline.resolve()) if pipeline is not None else None, "components": components,
                "torch": torch.__version__}
        (staging.folder / "dde_export.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.publish(checkpoint=info["checkpoint"])
    if pipeline is not None:
        log(f"{TOOL}: copied {len(components) - 1} components of {pipeline} ({copied / 2**20:.1f} MiB; "
            f"{skipped / 2**20:.1f} MiB of other weight formats left out) with the trained UNet")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="RUN/checkpoints/step-NNNNNNNN, or the run folder RUN (its newest complete step)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (absent, empty or an earlier export)")
    parser.add_argument("--pipeline", type=Path, default=None, help="source diffusers pipeline for a full folder")
    args = parser.parse_args(argv)

    def body() -> int:
        out = export(args.checkpoint, args.out, args.pipeline)
        print(f"{TOOL}: wrote {out}")
        return 0

    return run_main(TOOL, body, on_os_error=f"; {args.out} was left as it was")


if __name__ == "__main__":
    raise SystemExit(main())
