"""Tiny random-weight annotators in the real annotators' file formats (for tests and dry runs).

CLI: python -m dde_tools.annotator_fixtures --out DIR [--seed N]

Writes into DIR:

    open_clip/dde-tiny-ViT.json              open_clip model config (register with --open-clip-config)
    pickscore/model/                         transformers CLIPModel (config.json + model.safetensors)
    pickscore/processor/                     CLIPProcessor (preprocessor_config.json + tokenizer files)
    hps/HPS_v2_compressed.pt                 {"state_dict": open_clip state dict} (torch.save)
    clip/open_clip_model.safetensors         open_clip state dict (safetensors)
    clip_bin/open_clip_pytorch_model.bin     the same model's state dict (torch.save)

The open_clip ones use the architecture TINY_ARCH (ViT-H-14's config with small widths).
DIR is written as a staging folder next to it and renamed into place; an existing DIR must be an
earlier output of this tool (common.MARKER) or empty.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dde_tools import fixtures
from dde_tools.common import StagedOutput, ToolError, check_output, run_main

TINY_ARCH = "dde-tiny-ViT"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_open_clip_config(out: Path) -> Path:
    path = Path(out) / "open_clip" / f"{TINY_ARCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2) + "\n")
    return path


def make_open_clip_model(config_path: Path, seed: int) -> torch.nn.Module:
    """A random TINY_ARCH model whose text projection's sign makes cos(image, text) mostly positive
    (with random weights all features point one way, so the CLIP score, clipped at 0, would be 0)."""
    import open_clip

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None).eval()
    probe = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        text = open_clip.get_tokenizer(TINY_ARCH)(fixtures.make_captions(seed, 4))
        cos = (model.encode_image(probe, normalize=True) * model.encode_text(text, normalize=True)).sum(-1)
        if cos.mean() < 0:
            model.text_projection.neg_()
    return model


def make_pickscore(model_dir: Path, processor_dir: Path, seed: int) -> None:
    """A tiny CLIPModel (logit scale 100, as PickScore_v1's) and its CLIPProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fixtures.make_tokenizer(Path(tmp), fixtures.make_captions(seed, 500))
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                        logit_scale_init_value=math.log(100.0))
    CLIPModel(config).save_pretrained(model_dir, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_dir)


def build(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny annotator into `out`; return the paths the CLIs take."""
    out = Path(out)
    config = write_open_clip_config(out)
    paths = {"open_clip_config": config, "pickscore_model": out / "pickscore" / "model",
             "pickscore_processor": out / "pickscore" / "processor", "hps": out / "hps" / "HPS_v2_compressed.pt",
             "clip": out / "clip", "clip_bin": out / "clip_bin"}
    make_pickscore(paths["pickscore_model"], paths["pickscore_processor"], seed)
    for path in (paths["hps"].parent, paths["clip"], paths["clip_bin"]):
        path.mkdir(parents=True, exist_ok=True)
    hps = make_open_clip_model(config, seed + 1).state_dict()
    torch.save({"state_dict": hps}, paths["hps"])
    clip = {k: v.contiguous() for k, v in make_open_clip_model(config, seed + 2).state_dict().items()}
    save_file(clip, paths["clip"] / "open_clip_model.safetensors")
    torch.save(clip, paths["clip_bin"] / "open_clip_pytorch_model.bin")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.seed < 0:
            raise ToolError("--seed", "out of range", "an integer >= 0", str(args.seed), "Pass a non-negative seed.")
        legacy = {"open_clip", "pickscore", "hps", "clip", "clip_bin"}
        out = check_output("annotator_fixtures", args.out, own_patterns=sorted(legacy),
                           legacy=lambda folder: set(p.name for p in folder.iterdir()) <= legacy)
        with StagedOutput("annotator_fixtures", out) as staging:
            paths = build(staging.folder, args.seed)
            staging.publish()
        for name, path in paths.items():
            print(f"annotator_fixtures: {name}: {args.out / path.relative_to(staging.folder)}")
        return 0

    return run_main("annotator_fixtures", body)


if __name__ == "__main__":
    raise SystemExit(main())
