"""Write a dde_train checkpoint back as diffusers folders.

    python -m dde_tools.export_diffusers --checkpoint RUN/checkpoints/step-N --out OUT [--pipeline SRC]

A checkpoint's ``unet/`` is already in diffusers layout (``config.json`` plus
``diffusion_pytorch_model.safetensors`` under diffusers' state-dict names). This tool checks it
(complete checkpoint, every UNet tensor present with the config's shapes), writes ``OUT/unet``
and, with ``--pipeline``, a whole pipeline folder: the source pipeline's other components with
the trained UNet in place, loadable by ``DiffusionPipeline.from_pretrained(OUT)``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


class ExportError(RuntimeError):
    """A checkpoint or pipeline that cannot be exported; the message says what and where."""


def check_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint's unet folder, after checking it is complete and loadable."""
    if not (checkpoint / "COMPLETE").is_file():
        raise ExportError(f"{checkpoint}: no COMPLETE marker: not a finished checkpoint (pick another step-* directory)")
    unet_dir = checkpoint / "unet"
    for name in ("config.json", WEIGHTS):
        if not (unet_dir / name).is_file():
            raise ExportError(f"{unet_dir / name}: missing from the checkpoint")
    return unet_dir


def load_unet(unet_dir: Path) -> UNet2DConditionModel:
    """Loads the UNet strictly: every parameter of the config must come from the file, shapes equal,
    values finite (a NaN or Inf weight would make every image of the exported pipeline NaN)."""
    try:
        config = UNet2DConditionModel.load_config(unet_dir)
    except OSError as error:
        raise ExportError(f"{unet_dir / 'config.json'}: not a readable diffusers UNet config ({error})") from error
    model = UNet2DConditionModel.from_config(config)
    try:
        state = load_file(unet_dir / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{unet_dir / WEIGHTS}: not a readable safetensors file ({error}); "
                          "the checkpoint is damaged: export another step-* directory") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{unet_dir / WEIGHTS}: tensor names do not match the UNet config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(f"{unet_dir / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                              f"the config expects {tuple(expected[name].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{unet_dir / WEIGHTS}: {name} holds non-finite values (NaN or Inf): "
                              "the checkpoint is damaged: export another step-* directory")
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(checkpoint: Path, out: Path, pipeline: Path | None = None) -> Path:
    """Writes OUT/unet (and the rest of the pipeline when ``pipeline`` is given); returns OUT."""
    unet = load_unet(check_checkpoint(checkpoint))
    if pipeline is not None and not (pipeline / "model_index.json").is_file():
        raise ExportError(f"{pipeline}: no model_index.json: not a diffusers pipeline folder")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if pipeline is not None:
        shutil.copytree(pipeline, staging, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    (staging / "dde_export.json").write_text(json.dumps({"checkpoint": str(checkpoint.resolve()),
                                                         "torch": torch.__version__}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoints/step-NNNNNNNN")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", type=Path, default=None, help="source diffusers pipeline for a full folder")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.pipeline)
    except ExportError as error:
        print(f"export_diffusers: error: {error}", file=sys.stderr)
        return 2
    print(f"export_diffusers: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
