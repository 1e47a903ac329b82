"""Write a dde_train checkpoint back as diffusers folders.

    python -m dde_tools.export_diffusers --checkpoint CHECKPOINT --out OUT [--pipeline SRC]
    python -m dde_tools.export_diffusers --checkpoint CHECKPOINT --out OUT --lora

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

A LoRA checkpoint (dde_train with model.lora.rank > 0) holds ``lora/`` instead of ``unet/``:
``adapter_model.safetensors`` (float32 ``<module>.lora_A.weight`` [rank, in] and
``<module>.lora_B.weight`` [out, rank] for adapted nn.Linear modules of the UNet) and ``lora.json``
(format dde-lora: rank, alpha, targets, base, unet_config); its policy is W0 + (alpha / rank) B A
on each adapted module, the base UNet elsewhere. Both files are checked (the JSON fields; each
tensor's name, partner, dtype and shape from the header, against an nn.Linear of the UNet that
unet_config describes, before anything is allocated; every value finite). With ``--lora`` OUT
becomes a diffusers LoRA folder: ``pytorch_lora_weights.safetensors`` as
``StableDiffusionPipeline.save_lora_weights`` writes it (keys ``unet.<module>.lora_A.weight``,
``unet.<module>.lora_B.weight``; rank and alpha in its ``lora_adapter_metadata``, without which
diffusers would load the adapters at scale 1), for ``pipe.load_lora_weights(OUT)`` on the base
pipeline (SD1.5 or SDXL; loading needs ``peft``). Without ``--lora`` it needs ``--pipeline BASE``:
the merged UNet (W0 + alpha / rank B A, W0 from BASE's unet, whose config must be the one the run
was trained on) is written as a full checkpoint's would be.

OUT is written as a staging folder next to it and renamed into place when complete; an existing
OUT must be an earlier export_diffusers output (common.MARKER) or empty: a run folder, a
checkpoint, a source pipeline or any other folder is refused, never overwritten.
Exit codes: 0 done, 1 a write failed (disk full, file too large), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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
# What to do about a damaged UNet folder, by whose it is.
CHECKPOINT_FIX = "export another step-* directory"
PIPELINE_FIX = "copy the pipeline folder again"
# A LoRA checkpoint (docs/formats.md section 3) and the diffusers LoRA folder written from it.
LORA_DIR = "lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "lora.json"
LORA_FORMAT = "dde-lora"
LORA_VERSION = 1
LORA_KEY = re.compile(r"(?P<module>[A-Za-z0-9_][A-Za-z0-9_.]*)\.lora_(?P<part>[AB])\.weight")
MAX_LORA_JSON_BYTES = 64 << 20
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


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
    if (given / "COMPLETE").exists() or (given / "unet").is_dir() or (given / LORA_DIR).is_dir() or \
            (given / "trainer_state.json").exists():
        return given, "as given"
    if (given / "checkpoints").is_dir():
        return newest_complete(given / "checkpoints"), f"the newest complete step of {given}"
    if given.name == "checkpoints" or any(_step_of(p) is not None for p in given.iterdir()):
        return newest_complete(given), f"the newest complete step of {given.parent}"
    raise ToolError(given, "--checkpoint is neither a checkpoint nor a run folder", "a step folder (COMPLETE, "
                    "unet/ or lora/) or a run folder (checkpoints/)", "neither",
                    "Pass RUN or RUN/checkpoints/step-NNNNNNNN.")


def check_checkpoint(checkpoint: Path, lora: bool = False) -> Path:
    """The checkpoint's unet/ folder (a full checkpoint) or lora/ folder (a LoRA checkpoint), after
    checking it is complete; `lora` (--lora) asks for a LoRA checkpoint."""
    if not (checkpoint / "COMPLETE").is_file():
        raise ExportError(f"{checkpoint}: no COMPLETE marker: not a finished checkpoint (pick another step-* directory)")
    unet_dir, lora_dir = checkpoint / "unet", checkpoint / LORA_DIR
    if lora_dir.is_dir():
        if os.path.lexists(unet_dir):
            raise ToolError(checkpoint, "a checkpoint with both unet/ and lora/", "one of them (unet/: a full "
                            "checkpoint, lora/: a LoRA checkpoint)", "both", f"The checkpoint is damaged: "
                            f"{CHECKPOINT_FIX}.")
        for name in (LORA_CONFIG, LORA_WEIGHTS):
            if not (lora_dir / name).is_file():
                raise ToolError(lora_dir / name, "missing from the LoRA checkpoint", f"{LORA_CONFIG} and "
                                f"{LORA_WEIGHTS} in {LORA_DIR}/", "nothing" if not os.path.lexists(lora_dir / name)
                                else "not a file", f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
        return lora_dir
    if lora:
        raise ToolError(checkpoint, "--lora needs a LoRA checkpoint", f"{LORA_DIR}/ ({LORA_WEIGHTS}, {LORA_CONFIG}), "
                        "written by dde_train with model.lora.rank > 0",
                        "unet/: a full checkpoint" if unet_dir.is_dir() else f"neither {LORA_DIR}/ nor unet/",
                        "Export it without --lora (with --pipeline for a whole pipeline).")
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


def check_unet_config(config: dict, path: Path, fix: str = CHECKPOINT_FIX) -> None:
    """Refuse sizes that would allocate absurd amounts before any model is built."""
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS):
            raise ExportError(f"{path}: {key} is {str(value)[:80]}: expected a list of 1 to {MAX_BLOCKS} entries "
                              f"(the config is damaged: {fix})")
    for key, limit in UNET_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        for leaf in _numbers(value):
            if isinstance(leaf, bool) or not isinstance(leaf, (int, float)) or not 0 <= leaf <= limit:
                raise ExportError(f"{path}: {key} is {str(value)[:80]}: expected numbers in 0..{limit} (SDXL's are "
                                  f"far below); the config is damaged or not a Stable Diffusion UNet: {fix}")


def _header(weights: Path, fix: str = CHECKPOINT_FIX) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype such as "F32", shape) from the header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as file:
            header = {}
            for key in file.keys():
                piece = file.get_slice(key)
                header[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{weights}: not a readable safetensors file ({error}); "
                          f"the file is damaged: {fix}") from error
    return header


def _header_shapes(weights: Path, fix: str = CHECKPOINT_FIX) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header (no tensor data read)."""
    return {key: shape for key, (_, shape) in _header(weights, fix).items()}


def _load_tensors(weights: Path, fix: str = CHECKPOINT_FIX) -> dict:
    """Every tensor of a safetensors file (its header checked first), each finite (a NaN or Inf weight
    would make every image of the exported pipeline NaN)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{weights}: not a readable safetensors file ({error}); "
                          f"the file is damaged: {fix}") from error
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{weights}: {name} holds non-finite values (NaN or Inf): the file is damaged: {fix}")
    return state


def unet_config(unet_dir: Path, fix: str = CHECKPOINT_FIX) -> dict:
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(unet_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"{unet_dir / 'config.json'}: not a readable diffusers UNet config ({error})") from error
    if not isinstance(config, dict):
        raise ExportError(f"{unet_dir / 'config.json'}: not a readable diffusers UNet config (not a JSON object)")
    check_unet_config(config, unet_dir / "config.json", fix)
    return config


def meta_unet(config: dict, path: Path, fix: str = CHECKPOINT_FIX):
    """The UNet a (size-checked) config describes, built on the meta device: nothing is allocated."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
    except Exception as error:  # diffusers raises many types for an inconsistent config
        raise ExportError(f"{path}: diffusers cannot build a UNet from this config "
                          f"({type(error).__name__}: {error})"[:400]) from error
    parameters = sum(t.numel() for t in model.state_dict().values())
    if parameters > MAX_PARAMETERS:
        raise ExportError(f"{path}: the config describes {parameters:.3g} parameters, more than "
                          f"{MAX_PARAMETERS:.3g}: the config is damaged ({fix})")
    return model


def check_unet(unet_dir: Path, fix: str = CHECKPOINT_FIX) -> dict:
    """The UNet config, once its sizes are sane and its tensors those of the weights file's header.
    The model is built on the meta device: nothing is allocated."""
    config = unet_config(unet_dir, fix)
    model = meta_unet(config, unet_dir / "config.json", fix)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes = _header_shapes(unet_dir / WEIGHTS, fix)
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


def load_unet(unet_dir: Path, fix: str = CHECKPOINT_FIX):
    """Loads the UNet strictly: every parameter of the config must come from the file, shapes equal,
    values finite."""
    from diffusers import UNet2DConditionModel

    config = check_unet(unet_dir, fix)
    model = UNet2DConditionModel.from_config(config)
    model.load_state_dict(_load_tensors(unet_dir / WEIGHTS, fix), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# A LoRA checkpoint: lora.json, then the adapters' header against the UNet, then the adapters

@dataclass
class Lora:
    """A LoRA checkpoint's lora/ folder, checked (read_lora)."""
    folder: Path
    rank: int
    alpha: float
    targets: list[str]
    base: Any
    unet_config: dict
    features: dict[str, tuple[int, int]]  # adapted module -> (in_features, out_features)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _lora_field(path: Path, key: str, what: str, value: Any) -> ToolError:
    return ToolError(f"{path}: {key}", "a bad value", what, f"{json.dumps(value)[:80]}",
                     f"The checkpoint is damaged or not written by this dde_train: {CHECKPOINT_FIX}.")


def read_lora_json(path: Path) -> dict:
    """lora.json, its fields checked (format, version, rank, alpha, targets, unet_config)."""
    size = path.stat().st_size
    if size > MAX_LORA_JSON_BYTES:
        raise ToolError(path, "lora.json is too large", f"at most {MAX_LORA_JSON_BYTES >> 20} MiB", f"{size} bytes",
                        f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise ToolError(path, "not valid JSON", f"the {LORA_CONFIG} dde_train writes (format {LORA_FORMAT})",
                        f"{err}"[:200], f"The checkpoint is damaged: {CHECKPOINT_FIX}.") from err
    if not isinstance(data, dict):
        raise ToolError(path, "not a JSON object", f"the {LORA_CONFIG} dde_train writes (format {LORA_FORMAT})",
                        type(data).__name__, f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
    if data.get("format") != LORA_FORMAT:
        raise ToolError(f"{path}: format", "not a dde LoRA description", f'"format": "{LORA_FORMAT}"',
                        json.dumps(data.get("format"))[:80], f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
    version = data.get("version")
    if isinstance(version, bool) or version != LORA_VERSION:
        raise ToolError(f"{path}: version", "a lora.json version this export_diffusers does not read",
                        f"version {LORA_VERSION}", json.dumps(version)[:80],
                        "Use the dde_tools of the dde_train that wrote the checkpoint.")
    rank, alpha, targets = data.get("rank"), data.get("alpha"), data.get("targets")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _lora_field(path, "rank", "an integer >= 1", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise _lora_field(path, "alpha", "a finite number > 0", alpha)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _lora_field(path, "targets", "a non-empty list of module names (strings)", targets)
    config = data.get("unet_config")
    if not isinstance(config, dict):
        raise _lora_field(path, "unet_config", "the base UNet's diffusers config (a JSON object)", config)
    check_unet_config(config, Path(f"{path}: unet_config"))
    return data


def _matches(module: str, target: str) -> bool:
    """peft's target_modules rule (and dde_train's model.lora.targets): the name or its end."""
    return module == target or module.endswith("." + target)


def check_adapters(header: dict[str, tuple[str, tuple[int, ...]]], model, lora_json: dict,
                   weights: Path) -> dict[str, tuple[int, int]]:
    """Adapted module -> (in_features, out_features), once every tensor of the header is an A or B of
    an nn.Linear of `model` with its partner, float32, of the shape the rank and the module give, and
    the modules are exactly the linear layers lora.json's targets match."""
    import torch

    rank, targets = lora_json["rank"], lora_json["targets"]
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, entry in header.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ToolError(f"{weights}: {key}", "not a LoRA tensor name",
                            "<module>.lora_A.weight or <module>.lora_B.weight (diffusers module names)", repr(key),
                            f"The checkpoint is damaged or not written by this dde_train: {CHECKPOINT_FIX}.")
        parts.setdefault(match["module"], {})[match["part"]] = entry
    if not parts:
        raise ToolError(weights, "no adapters", "a lora_A and lora_B tensor for each adapted module", "no tensors",
                        f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
    modules = dict(model.named_modules())
    linears = {name for name, m in modules.items() if isinstance(m, torch.nn.Linear)}
    features = {}
    for module, pair in sorted(parts.items()):
        for part, other in (("A", "B"), ("B", "A")):
            if part not in pair:
                raise ToolError(f"{weights}: {module}.lora_{other}.weight", f"lora_{other} without its lora_{part}",
                                f"{module}.lora_A.weight and {module}.lora_B.weight", f"no {module}.lora_{part}.weight",
                                f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
        layer = modules.get(module)
        if not isinstance(layer, torch.nn.Linear):
            hint = " (names carry no 'unet.' prefix)" if module.startswith("unet.") else ""
            raise ToolError(f"{weights}: {module}.lora_A.weight", "an adapter of no linear layer of the base UNet",
                            "an nn.Linear of the UNet that lora.json's unet_config describes" + hint,
                            "no such module" if layer is None else f"a {type(layer).__name__}",
                            f"The checkpoint is damaged (its adapters and unet_config disagree): {CHECKPOINT_FIX}.")
        if not any(_matches(module, t) for t in targets):
            raise ToolError(f"{weights}: {module}.lora_A.weight", "an adapter of a module no target names",
                            f"a module ending in one of lora.json's targets {targets}", module,
                            f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
        n_in, n_out = layer.in_features, layer.out_features
        for part, want in (("A", (rank, n_in)), ("B", (n_out, rank))):
            dtype, shape = pair[part]
            name = f"{module}.lora_{part}.weight"
            if dtype != "F32":
                raise ToolError(f"{weights}: {name}", "an adapter tensor that is not float32", "dtype F32", dtype,
                                f"The checkpoint is damaged: {CHECKPOINT_FIX}.")
            if shape != want:
                raise ToolError(f"{weights}: {name}", f"lora_{part} of the wrong shape",
                                f"{list(want)} ({'[rank, in_features]' if part == 'A' else '[out_features, rank]'} "
                                f"with rank {rank} from lora.json, {module}: in {n_in}, out {n_out})", f"{list(shape)}",
                                f"The checkpoint is damaged or lora.json's rank is not its adapters': "
                                f"{CHECKPOINT_FIX}.")
        features[module] = (n_in, n_out)
    left_out = sorted(m for m in linears if m not in features and any(_matches(m, t) for t in targets))
    if left_out:
        raise ToolError(weights, "linear layers lora.json's targets name have no adapters",
                        f"an adapter for every nn.Linear ending in one of {targets}",
                        f"{len(left_out)} without, such as {left_out[:3]}", f"The checkpoint is damaged: "
                        f"{CHECKPOINT_FIX}.")
    return features


def read_lora(lora_dir: Path) -> Lora:
    """A LoRA checkpoint's lora/ folder, checked: lora.json, then each adapter's name, partner, dtype
    and shape from the header against the UNet unet_config describes (built on the meta device)."""
    config_path = lora_dir / LORA_CONFIG
    data = read_lora_json(config_path)
    model = meta_unet(data["unet_config"], Path(f"{config_path}: unet_config"))
    features = check_adapters(_header(lora_dir / LORA_WEIGHTS), model, data, lora_dir / LORA_WEIGHTS)
    return Lora(lora_dir, data["rank"], float(data["alpha"]), list(data["targets"]), data.get("base"),
                data["unet_config"], features)


def merge_lora(unet, lora: Lora, adapters: dict) -> None:
    """W = W0 + (alpha / rank) B A on each adapted layer of `unet`, in place (float32)."""
    import torch

    modules = dict(unet.named_modules())
    weights = lora.folder / LORA_WEIGHTS
    with torch.no_grad():
        for module, (n_in, n_out) in lora.features.items():
            layer = modules.get(module)
            if not isinstance(layer, torch.nn.Linear) or (layer.in_features, layer.out_features) != (n_in, n_out):
                actual = "no such module" if layer is None else (
                    f"a {type(layer).__name__}" if not isinstance(layer, torch.nn.Linear)
                    else f"in {layer.in_features}, out {layer.out_features}")
                raise ToolError(f"{weights}: {module}.lora_A.weight", "an adapter that does not fit the pipeline's "
                                "UNet", f"an nn.Linear with in {n_in}, out {n_out}", actual,
                                "Pass the pipeline the run was exported from (export_models --pipeline).")
            merged = torch.addmm(layer.weight.float(), adapters[f"{module}.lora_B.weight"],
                                 adapters[f"{module}.lora_A.weight"], alpha=lora.scale)
            if not bool(torch.isfinite(merged).all()):
                raise ToolError(f"{weights}: {module}", "merging gives non-finite weights",
                                f"finite W0 + {lora.scale:g} B A", "NaN or Inf", "Check alpha and rank in lora.json.")
            layer.weight.copy_(merged)


def lora_metadata(lora: Lora) -> dict:
    """The peft LoraConfig fields diffusers' load_lora_weights builds the adapters from (without it
    diffusers infers lora_alpha = r, scale 1); rank_pattern must be present (diffusers reads it)."""
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.features),
            "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False}


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


def check_fit(config: dict, pipeline: Path, keys: Iterable[str] | None = FIT_KEYS,
              source: str = "the checkpoint") -> None:
    """The trained UNet must be a drop-in for the pipeline's own (same inputs and conditioning):
    equal `keys` of the two configs; keys=None: every key both have (but diffusers' own `_...`),
    for adapters that need the very UNet they were trained on."""
    own = pipeline / "unet" / "config.json"
    if not own.is_file():
        return
    try:
        theirs = json.loads(own.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ToolError(own, "not valid JSON", "a diffusers UNet config", f"{err}"[:200],
                        "Copy the pipeline folder again.") from err
    if not isinstance(theirs, dict):
        return
    if keys is None:
        keys = [k for k in theirs if not k.startswith("_") and k in config]
    differ = [k for k in keys if k in theirs and theirs.get(k) != config.get(k)]
    if differ:
        key = differ[0]
        raise ToolError(pipeline, f"{source}'s UNet does not fit this pipeline",
                        f"{key} = {json.dumps(theirs[key])} (the pipeline's UNet, {own})",
                        f"{json.dumps(config.get(key))} in {source}",
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


def _base_unet_dir(pipeline: Path) -> Path:
    """The pipeline's own UNet folder, where a LoRA is merged into its weights."""
    unet_dir = pipeline / "unet"
    for name in ("config.json", WEIGHTS):
        if not (unet_dir / name).is_file():
            raise ToolError(unet_dir / name, "the base pipeline's UNet is missing", "the base UNet the LoRA is "
                            f"merged into: unet/config.json and unet/{WEIGHTS}", "nothing" if not
                            os.path.lexists(unet_dir / name) else "not a file", "Pass the pipeline the run was "
                            "exported from (export_models --pipeline), with its UNet in safetensors.")
    return unet_dir


def export(checkpoint: Path, out: Path, pipeline: Path | None = None, lora: bool = False, log=print) -> Path:
    """Writes OUT/unet (and the rest of the pipeline when ``pipeline`` is given), or with ``lora`` a
    diffusers LoRA folder; returns OUT."""
    step_dir, chosen = resolve_checkpoint(Path(checkpoint))
    if chosen != "as given":
        log(f"{TOOL}: exporting {step_dir} ({chosen})")
    if lora and pipeline is not None:
        raise ToolError(pipeline, "--lora and --pipeline together", "one of them: --lora writes the adapters as a "
                        "diffusers LoRA folder, --pipeline the merged UNet in a whole pipeline", "both",
                        "Drop --pipeline (load the LoRA onto the base with load_lora_weights), or drop --lora.")
    folder = check_checkpoint(step_dir, lora=lora)
    adapters = None
    if folder.name == LORA_DIR:
        if not lora and pipeline is None:
            raise ToolError(step_dir, "a LoRA checkpoint needs --lora or --pipeline", "--lora (write a diffusers "
                            "LoRA folder) or --pipeline BASE (write the merged UNet in a whole pipeline)",
                            f"{LORA_DIR}/ and neither option", "Pass --lora, or --pipeline with the pipeline the "
                            "run's base was exported from (export_models --pipeline).")
        adapters = read_lora(folder)
        config = adapters.unet_config
    else:
        config = check_unet(folder)
    components = []
    if pipeline is not None:
        pipeline = Path(pipeline)
        components = pipeline_components(pipeline)
        if adapters is None:
            check_fit(config, pipeline)
        else:
            check_fit(config, pipeline, keys=None, source=f"{folder / LORA_CONFIG} (unet_config)")
            check_unet(_base_unet_dir(pipeline), PIPELINE_FIX)
    sources = [step_dir] + ([pipeline] if pipeline is not None else [])
    real_out = check_output(TOOL, Path(out), inputs=sources, no_write_inside=sources,
                            own_patterns=_legacy_patterns(Path(out)) if _legacy_output(Path(out)) else (),
                            legacy=_legacy_output)
    import torch

    tensors = _load_tensors(folder / LORA_WEIGHTS) if adapters is not None else None
    unet = None
    if adapters is None:
        unet = load_unet(folder)
    elif not lora:
        unet = load_unet(_base_unet_dir(pipeline), PIPELINE_FIX)
        merge_lora(unet, adapters, tensors)
    info = {"checkpoint": str(step_dir.resolve()), "step": _step_of(step_dir), "chosen": chosen,
            "pipeline": str(pipeline.resolve()) if pipeline is not None else None, "components": components,
            "torch": torch.__version__}
    if adapters is not None:
        info["lora"] = {"rank": adapters.rank, "alpha": adapters.alpha, "scale": adapters.scale,
                        "targets": adapters.targets, "modules": len(adapters.features), "base": adapters.base,
                        "written_as": "diffusers LoRA" if lora else "merged into the pipeline's UNet"}

    with StagedOutput(TOOL, real_out) as staging:
        copied = skipped = 0
        if lora:
            from diffusers.loaders import StableDiffusionLoraLoaderMixin

            with writing(staging.folder / DIFFUSERS_LORA_WEIGHTS):
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    staging.folder, unet_lora_layers=tensors, weight_name=DIFFUSERS_LORA_WEIGHTS,
                    unet_lora_adapter_metadata=lora_metadata(adapters))
        else:
            if pipeline is not None:
                with writing(staging.folder / "model_index.json"):
                    shutil.copyfile(pipeline / "model_index.json", staging.folder / "model_index.json")
                for name in components:
                    if name != "unet":
                        done = copy_component(pipeline / name, staging.folder / name)
                        copied, skipped = copied + done[0], skipped + done[1]
            with writing(staging.folder / "unet" / WEIGHTS):
                unet.save_pretrained(staging.folder / "unet", safe_serialization=True)
        (staging.folder / "dde_export.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.publish(checkpoint=info["checkpoint"])
    if lora:
        log(f"{TOOL}: wrote {len(adapters.features)} adapters (rank {adapters.rank}, alpha {adapters.alpha:g}: "
            f"scale {adapters.scale:g}) as a diffusers LoRA; load it with pipe.load_lora_weights(OUT) on the base "
            "pipeline (needs peft)")
    elif adapters is not None:
        log(f"{TOOL}: merged {len(adapters.features)} adapters (rank {adapters.rank}, scale {adapters.scale:g}) "
            f"into the UNet of {pipeline}")
    if pipeline is not None:
        log(f"{TOOL}: copied {len(components) - 1} components of {pipeline} ({copied / 2**20:.1f} MiB; "
            f"{skipped / 2**20:.1f} MiB of other weight formats left out) with the trained UNet")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="RUN/checkpoints/step-NNNNNNNN, or the run folder RUN (its newest complete step)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (absent, empty or an earlier export)")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="source diffusers pipeline for a full folder (for a LoRA checkpoint: its base, into "
                             "whose UNet the adapters are merged)")
    parser.add_argument("--lora", action="store_true",
                        help="a LoRA checkpoint as a diffusers LoRA folder (pytorch_lora_weights.safetensors) "
                             "for load_lora_weights on the base pipeline")
    args = parser.parse_args(argv)

    def body() -> int:
        out = export(args.checkpoint, args.out, args.pipeline, lora=args.lora)
        print(f"{TOOL}: wrote {out}")
        return 0

    return run_main(TOOL, body, on_os_error=f"; {args.out} was left as it was")


if __name__ == "__main__":
    raise SystemExit(main())
