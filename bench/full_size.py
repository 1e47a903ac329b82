"""Full-size SD1.5 and SDXL architectures (random weights) on the CPU: export parity, per-block
activation memory, and a few training steps of dde_train with checkpointing on/off and frozen
models in fp32/bf16. Not part of the tests (minutes and ~20 GB of RAM); results land in
bench/results/full_size-<date>.json and bench/README.md.

    .venv/bin/python bench/full_size.py build --family sd15 --out /tmp/full/sd15
    .venv/bin/python bench/full_size.py parity --family sd15 --pipeline /tmp/full/sd15 --out /tmp/full/sd15_export
    .venv/bin/python bench/full_size.py activations --family sdxl --size 32
    .venv/bin/python bench/full_size.py train --export /tmp/full/sd15_export --steps 3 --frozen bf16
    .venv/bin/python bench/full_size.py fit  (the micro-batch table from the recorded results)

The pipelines take their tokenizers and scheduler from the tiny fixture (fixtures/source): no
download is possible here, and the token ids only need to fit the full-size vocabulary (49408).
The configs are the published diffusers configs of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (UNet, VAE, CLIP ViT-L/14, OpenCLIP ViT-bigG/14).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from dde_tools import unet_blocks  # noqa: E402

RESULTS = REPO / "bench" / "results" / f"full_size-{date.today().isoformat()}.json"
MiB = 2**20

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def unet_config(family: str) -> dict:
    return SD15_UNET if family == "sd15" else SDXL_UNET


def build(family: str, out: Path) -> None:
    """A full-size random-weight pipeline folder (fixture tokenizers and scheduler)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tiny = REPO / "fixtures" / "source" / family
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("unet", "vae", "text_encoder*", "dde_fixture.json"))
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_config(family)).save_pretrained(out / "unet")
    scaling = 0.18215 if family == "sd15" else 0.13025
    AutoencoderKL(**VAE, sample_size=512 if family == "sd15" else 1024, scaling_factor=scaling).save_pretrained(out / "vae")
    encoders = [("text_encoder", "tokenizer", CLIP_L, CLIPTextModel)]
    if family == "sdxl":
        encoders.append(("text_encoder_2", "tokenizer_2", CLIP_BIGG, CLIPTextModelWithProjection))
    for name, tok_name, cfg, cls in encoders:
        tok = CLIPTokenizer.from_pretrained(out / tok_name)
        config = CLIPTextConfig(**cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        cls(config).save_pretrained(out / name)
    print(f"build: {family} full-size pipeline in {out}")


def parity(pipeline: Path, out: Path, resolution: int) -> dict:
    """export_models on the full-size pipeline: the per-block parity against diffusers."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "scripts"))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dde_tools.export_models", "--pipeline", str(pipeline),
                           "--out", str(out), "--resolution", str(resolution)], env=env, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-2000:])
    errors = {k: float(v) for k, v in re.findall(r"^parity (\w+): max_abs_err=(\S+) ", proc.stdout, flags=re.M)}
    return {"resolution": resolution, "returncode": proc.returncode, "parity_max_abs_err": errors,
            "seconds": round(time.time() - start, 1)}


def activations(family: str, size: int, batch: int = 1) -> dict:
    """Bytes autograd keeps for backward, per UNet block (saved-tensor hooks), at one latent size.

    Without checkpointing a step keeps all of them; with it, only each block's inputs and
    outputs, plus one block's saved tensors while that block is recomputed in backward.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = unet_config(family)
    unet = UNet2DConditionModel(**cfg).train()
    blocks = unet_blocks.split_unet(unet)
    x = torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,))
    ehs = torch.randn(batch, 77, cfg["cross_attention_dim"])
    added = (torch.randn(batch, 1280), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)) if family == "sdxl" else ()
    per_block: dict[str, int] = {}
    boundary: dict[str, int] = {}
    seen: set[int] = set()

    def runner(block):
        def call(*args):
            total = 0

            def pack(tensor):
                nonlocal total
                key = tensor.untyped_storage().data_ptr()
                if key not in seen and not isinstance(tensor, torch.nn.Parameter):
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = block.module(*args)
            per_block[block.name] = total
            outs = out if isinstance(out, tuple) else (out,)
            boundary[block.name] = sum(o.numel() * o.element_size() for o in outs)
            return out

        return call

    for p in unet.parameters():
        seen.add(p.untyped_storage().data_ptr())
    unet_blocks.run_blocks([(b, runner(b)) for b in blocks], x, t, ehs, *added)
    return {"family": family, "latent": size, "batch": batch,
            "saved_mb": {k: round(v / MiB, 1) for k, v in per_block.items()},
            "boundary_mb": {k: round(v / MiB, 1) for k, v in boundary.items()},
            "total_saved_mb": round(sum(per_block.values()) / MiB, 1),
            "checkpointed_mb": round((sum(boundary.values()) + max(per_block.values())) / MiB, 1)}


def timed_train(sets: list[str], run: Path, env: dict) -> tuple[subprocess.CompletedProcess, float | None, list[dict]]:
    """dde_train on the tiny config with `sets`, under /usr/bin/time -v: the process, its peak RSS
    in MiB (None if time printed none) and the step records of run/metrics.jsonl."""
    cmd = ["/usr/bin/time", "-v", str(REPO / "build" / "dde_train"), "--config", str(REPO / "configs" / "tiny_dde.yaml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"kind":"step"' in line.replace(" ", "")] if (run / "metrics.jsonl").exists() else []
    return proc, round(int(peak.group(1)) / 1024, 1) if peak else None, steps


def train(export: Path, shards: Path, out: Path, steps: int, optim: str, frozen_dtypes: list[str],
          checkpointing_modes: list[bool]) -> list[dict]:
    """dde_train steps at micro-batch 1 with checkpointing on/off x the frozen dtypes. The
    activation memory of a step is the last step's mem_peak_mb - mem_held_mb (the first step
    also allocates the optimizer state)."""
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(os.cpu_count()))
    for frozen in frozen_dtypes:
        for checkpointing in checkpointing_modes:
            run = out / f"ckpt{int(checkpointing)}_{frozen}"
            shutil.rmtree(run, ignore_errors=True)
            sets = [f"model.manifest={export / 'manifest.json'}", f"data.index={shards / 'index.json'}",
                    f"run.output_dir={run}", f"train.max_steps={steps}", "train.global_batch=1", "train.micro_batch=1",
                    f"train.gradient_checkpointing={str(checkpointing).lower()}", f"model.frozen_dtype={frozen}",
                    "checkpoint.every=1000", "data.workers=1", "optim.warmup_steps=0", "method.name=dde",
                    "data.eval_index=",  # no held-out evaluation: it would run full-size forwards
                    f"optim.name={optim}"]
            start = time.time()
            proc, peak_mb, steps_log = timed_train(sets, run, env)
            row = {"gradient_checkpointing": checkpointing, "frozen_dtype": frozen, "optim": optim,
                   "returncode": proc.returncode,
                   "peak_rss_mb": peak_mb,
                   "seconds": round(time.time() - start, 1),
                   "steps": [{k: s.get(k) for k in ("step", "loss", "mem_held_mb", "mem_peak_mb", "mem_forward_peak_mb", "pairs_per_s")}
                             for s in steps_log]}
            last = steps_log[-1] if steps_log else {}
            row["activation_mb"] = round(last["mem_peak_mb"] - last["mem_held_mb"], 1) if last else None
            # The forward's own growth (the gradients are allocated only in backward).
            row["forward_activation_mb"] = (round(last["mem_forward_peak_mb"] - last["mem_held_mb"], 1)
                                            if last.get("mem_forward_peak_mb") else None)
            print(json.dumps(row), flush=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
            rows.append(row)
    return rows


# One GPU (issue 27): the full fine-tune against LoRA and mapo, each a row of `full_size.py one_gpu`.
ONE_GPU_ROWS = {
    "full fine-tune (dde)": ["method.name=dde"],
    "LoRA rank 8 (dde)": ["method.name=dde", "model.lora={rank: 8}"],
    "mapo (full, no reference)": ["method.name=mapo"],
    "mapo + LoRA rank 8": ["method.name=mapo", "model.lora={rank: 8}"],
}


def one_gpu(export: Path, shards: Path, out: Path, steps: int, rows: list[str]) -> list[dict]:
    """dde_train at micro-batch 1, fp32 frozen models, AdamW, gradient checkpointing on, for each
    row of ONE_GPU_ROWS, side by side in one invocation: peak RSS (/usr/bin/time), parameters
    trained (the optimizer's tensors in the checkpoint), optimizer-state bytes (its
    training_state.safetensors, less the correction array) and pairs/s of the last step."""
    from safetensors import safe_open

    results = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(os.cpu_count()))
    for name in rows:
        run = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        shutil.rmtree(run, ignore_errors=True)
        sets = [f"model.manifest={export / 'manifest.json'}", f"data.index={shards / 'index.json'}",
                f"run.output_dir={run}", f"train.max_steps={steps}", "train.global_batch=1", "train.micro_batch=1",
                "train.gradient_checkpointing=true", "model.frozen_dtype=fp32", f"checkpoint.every={steps}",
                "data.workers=1", "optim.warmup_steps=0", "optim.name=adamw", "data.eval_index=",
                *ONE_GPU_ROWS[name]]
        start = time.time()
        proc, peak_mb, records = timed_train(sets, run, env)
        state = run / "checkpoints" / f"step-{steps:08d}" / "training_state.safetensors"
        optimizer_bytes, tensors = 0, set()
        if state.exists():
            with safe_open(str(state), "pt") as f:
                for key in f.keys():
                    if key.startswith("correction."):
                        continue
                    shape = f.get_slice(key).get_shape()
                    optimizer_bytes += 4 * int(torch.tensor(shape).prod().item()) if shape else 4
                    tensors.add(key.rsplit(".", 1)[0])
        trained = re.search(r"(\d+) parameters trained", (run / "train.log").read_text()) if (run / "train.log").exists() else None
        row = {"row": name, "returncode": proc.returncode,
               "peak_rss_mb": peak_mb,
               "parameters_trained": int(trained.group(1)) if trained else None,
               "optimizer_state_mb": round(optimizer_bytes / MiB, 1),
               "pairs_per_s": records[-1].get("pairs_per_s") if records else None,
               "seconds": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
        results.append(row)
    return results


def count_params(family: str) -> dict[str, float]:
    """Parameters of the UNet and of the other frozen models (VAE encoder, text encoders), built on
    the meta device from the configs above."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    count = lambda m: float(sum(p.numel() for p in m.parameters()))  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family))
        vae = AutoencoderKL(**VAE)
        other = count(vae.encoder) + count(vae.quant_conv) + count(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        if family == "sdxl":
            other += count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))
    return {"unet": count(unet), "frozen_other": other}


GPUS_GB = {"80 GB (H100/A100)": 80, "141 GB (H200)": 141}
OVERHEAD_GB = 4.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack (assumed, not measured here)


def fit(results: dict) -> list[dict]:
    """Largest micro-batch (pairs) per rank that fits, from the measured activation bytes per image.

    Activations scale with the latent area (attention runs as fused SDPA, O(tokens) memory), so the
    figure measured at latent L is scaled by (target / L)^2; a pair is two images (winner, loser).
    Static memory: fp32 policy weights and gradients, optimizer state (AdamW: 8 bytes/param;
    Adafactor: factored, ~0), the reference UNet and the frozen encoders in fp32 or bf16.
    """
    rows = []
    for family, target in (("sd15", 64), ("sdxl", 128)):
        acts = [v for k, v in results.items() if k.startswith(f"activations_{family}_")]
        if not acts:
            continue
        act = max(acts, key=lambda a: a["latent"])
        scale = (target / act["latent"]) ** 2
        p = count_params(family)
        for optimizer, opt_bytes in (("adamw", 8), ("adafactor", 0)):
            for frozen, frozen_bytes in (("fp32", 4), ("bf16", 2)):
                static = p["unet"] * (4 + 4 + opt_bytes + frozen_bytes) + p["frozen_other"] * frozen_bytes
                for checkpointing in checkpointing_modes:
                    per_pair = 2 * scale * (act["checkpointed_mb"] if checkpointing else act["total_saved_mb"]) * MiB
                    row = {"family": family, "px": target * 8, "optimizer": optimizer, "frozen_dtype": frozen,
                           "gradient_checkpointing": checkpointing, "static_gb": round(static / 1e9, 1),
                           "activation_gb_per_pair": round(per_pair / 1e9, 2)}
                    for gpu, gb in GPUS_GB.items():
                        row[gpu] = max(0, int((gb * 1e9 - OVERHEAD_GB * 1e9 - static) // per_pair))
                    rows.append(row)
    return rows


def record(key: str, value) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    b.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("parity")
    p.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    p.add_argument("--pipeline", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resolution", type=int, default=256)
    a = sub.add_parser("activations")
    a.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    a.add_argument("--size", type=int, default=32, help="latent size (pixels / 8)")
    t = sub.add_parser("train")
    t.add_argument("--export", type=Path, required=True)
    t.add_argument("--shards", type=Path, default=REPO / "fixtures" / "shards" / "sd15")
    t.add_argument("--out", type=Path, default=Path("/tmp/dde_full_size_runs"))
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--optim", choices=["adamw", "adafactor"], default="adafactor",
                   help="adafactor (default) keeps the run under ~12 GB of RAM; adamw needs ~19 GB")
    t.add_argument("--frozen", nargs="+", choices=["fp32", "bf16"], default=["bf16", "fp32"])
    t.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    g = sub.add_parser("one_gpu", help="full fine-tune, LoRA rank 8, mapo, mapo + LoRA: memory and speed")
    g.add_argument("--export", type=Path, required=True)
    g.add_argument("--shards", type=Path, default=REPO / "fixtures" / "shards" / "sd15")
    g.add_argument("--out", type=Path, default=Path("/tmp/dde_full_size_one_gpu"))
    g.add_argument("--steps", type=int, default=2)
    g.add_argument("--rows", nargs="+", choices=list(ONE_GPU_ROWS), default=list(ONE_GPU_ROWS))
    sub.add_parser("fit")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.cmd == "build":
        build(args.family, args.out)
    elif args.cmd == "parity":
        result = parity(args.pipeline, args.out, args.resolution)
        print(json.dumps(result))
        record(f"parity_{args.family}", result)
    elif args.cmd == "activations":
        result = activations(args.family, args.size)
        print(json.dumps(result, indent=1))
        record(f"activations_{args.family}_{args.size}", result)
    elif args.cmd == "train":
        rows = train(args.export, args.shards, args.out, args.steps, args.optim, args.frozen,
                     [mode == "on" for mode in args.checkpointing])
        key = f"train_sd15_{args.optim}"
        earlier = json.loads(RESULTS.read_text()).get(key, []) if RESULTS.exists() else []
        done = {(r["gradient_checkpointing"], r["frozen_dtype"]) for r in rows}
        record(key, [r for r in earlier if (r["gradient_checkpointing"], r["frozen_dtype"]) not in done] + rows)
    elif args.cmd == "one_gpu":
        rows = one_gpu(args.export, args.shards, args.out, args.steps, args.rows)
        record("one_gpu_sd15_256", rows)
        print("| run | peak RSS | parameters trained | optimizer state | pairs/s |\n| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['row']} | {r['peak_rss_mb']} MiB | {r['parameters_trained']} | "
                  f"{r['optimizer_state_mb']} MiB | {r['pairs_per_s']} |")
    else:
        rows = fit(json.loads(RESULTS.read_text()))
        keys = ["family", "px", "optimizer", "frozen_dtype", "gradient_checkpointing", "static_gb",
                "activation_gb_per_pair", *GPUS_GB]
        print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
