"""dde_train against a Python loop that reproduces the step of Diffusion-DPO's train.py, side by side.

    .venv/bin/python bench/vs_diffusion_dpo.py [--device cpu|cuda] [--size mid|full|tiny]
        [--rounds 2] [--steps 8] [--warmup 2] [--global-batch 4] [--threads N]
        [--dde-set key=value ...] [--work DIR] [--out FILE]

Both sides train the same random-weight diffusers pipeline on the same synthetic Pick-a-Pic
parquet (dde_train through its exports: TorchScript + manifest, tar shards), alternating
(dde, python, dde, python, ...) in one run so that machine load hits both alike.

The Python loop is Diffusion-DPO's train.py step (SalesforceAIResearch/DiffusionDPO, see
docs/method.md §9): VAE encode of [winner; loser] every step (latent_dist.sample() x
scaling factor), one t and one noise per pair shared by winner and loser, the text embedding
repeated for both, per-image MSE over C,H,W, model_diff = mse_w - mse_l, ref_diff likewise with the
frozen reference UNet, loss = -logsigmoid(-0.5 beta (model_diff - ref_diff)).mean() with beta 5000,
gradient accumulation to the global batch, grad-norm clipping at 1.0, AdamW (0.9, 0.999, wd 1e-2,
eps 1e-8). Data: PIL decode, shorter side resized bilinear, centre crop, flip p = 0.5, [-1, 1], a
torch DataLoader with as many workers as dde_train's data.workers. On CUDA it runs at Diffusion-DPO's
own settings: micro-batch 1, fp16 autocast with a GradScaler, frozen models in half precision.
dde_train runs method `uniform` (Diffusion-DPO's objective) with the same global batch, beta, lr.

Reported per side (median over rounds): pairs/s over the steps after --warmup, peak RSS of the
process tree (polled from /proc, DataLoader workers included; also the main process's ru_maxrss),
on CUDA the peak GPU memory (nvidia-smi, both sides alike; the Python side also reports
torch.cuda.max_memory_allocated), and dde/python ratios. On CUDA also TFLOP/s and MFU, with the
FLOPs per pair counted by torch.utils.flop_counter.FlopCounterMode on the diffusers modules.

Sizes: `mid` (CPU default) is SD1.5's UNet architecture (four blocks, three with cross-attention,
two layers per block) at block_out_channels (64, 128, 256, 256), a 4-layer 256-wide CLIP text
encoder, an SD-VAE at (32, 64, 128, 128), 64 px (8x8 latents); `full` (CUDA default) is SD1.5 itself (random
weights, 512 px); `tiny` is a smoke size for --dry-run checks. Not a test: the JSON records the
machine, its load and the git revision.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SIZES = {
    # unet block_out_channels, vae block_out_channels, text (hidden, layers, heads), resolution
    "tiny": {"unet": (32, 32, 64, 64), "vae": (8, 16, 32, 32), "text": (32, 2, 4), "resolution": 64},
    "mid": {"unet": (64, 128, 256, 256), "vae": (32, 64, 128, 128), "text": (256, 4, 4), "resolution": 64},
    "full": {"unet": (320, 640, 1280, 1280), "vae": (128, 256, 512, 512), "text": (768, 12, 12), "resolution": 512},
}
BETA = 5000.0
LR = 1e-5
BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 at boost clock (NVIDIA datasheet)


# ---------------------------------------------------------------- fixtures (pipeline, parquet, exports)

def make_pipeline(out: Path, size: str, seed: int = 0) -> None:
    """A random-weight StableDiffusionPipeline with SD1.5's architecture at the widths of `size`."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dde_tools import fixtures

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fixtures.make_tokenizer(Path(tmp), fixtures.make_captions(seed, 2000))
    torch.manual_seed(seed)
    hidden, layers, heads = spec["text"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(  # SD1.5's unet/config.json but for the widths
        sample_size=spec["resolution"] // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=spec["unet"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=hidden, attention_head_dim=8, norm_num_groups=min(32, spec["unet"][0] // 2))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec["vae"], layers_per_block=2, latent_channels=4,
        norm_num_groups=min(32, spec["vae"][0] // 2), sample_size=spec["resolution"], scaling_factor=0.18215)
    with torch.no_grad():  # a narrow posterior, as a trained VAE's (see fixtures._vae)
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-12.0)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=fixtures._scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out, safe_serialization=True)


def prepare(work: Path, size: str, rows: int) -> dict:
    """Pipeline, parquet, exports and shards under work/<size>/, each built once (stamp files)."""
    base = work / size
    paths = {"pipeline": base / "pipeline", "parquet": base / "pickapic" / "train-00000.parquet",
             "export": base / "export", "shards": base / "shards"}
    py = [sys.executable, "-m"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    if not (paths["pipeline"] / "model_index.json").is_file():
        print(f"bench: making the {size} pipeline", flush=True)
        make_pipeline(paths["pipeline"], size)
    if not paths["parquet"].is_file():
        from dde_tools import fixtures
        fixtures.make_pickapic_parquet(paths["parquet"], rows=rows, seed=1, tie_fraction=0.0)
    if not (paths["export"] / "manifest.json").is_file():
        print("bench: exporting the pipeline (TorchScript + manifest)", flush=True)
        # Random full-size weights give large activations: a looser traced/eager parity limit there.
        limit = ["--max-abs-err", "1e-2"] if size == "full" else []
        subprocess.run(py + ["dde_tools.export_models", "--pipeline", str(paths["pipeline"]), "--out",
                             str(paths["export"])] + limit, check=True, env=env)
    if not (paths["shards"] / "index.json").is_file():
        subprocess.run(py + ["dde_tools.export_pickapic", "--parquet", str(paths["parquet"]), "--out",
                             str(paths["shards"]), "--tokenizer", str(paths["export"] / "tokenizer"),
                             "--pairs-per-shard", "64"], check=True, env=env)
    return paths


# ---------------------------------------------------------------- the Python loop (Diffusion-DPO's step)

class PickapicPairs:
    """Diffusion-DPO's preprocessing of Pick-a-Pic rows: ties dropped, winner first, per image
    resize (shorter side, bilinear), centre crop, flip p = 0.5, [-1, 1]; caption token ids."""

    def __init__(self, parquet: Path, tokenizer, resolution: int):
        import pyarrow.parquet as pq
        table = pq.read_table(parquet, columns=["jpg_0", "jpg_1", "label_0", "caption"]).to_pylist()
        self.rows = [r for r in table if r["label_0"] in (0.0, 1.0)]
        self.tokenizer = tokenizer
        from torchvision import transforms  # as Diffusion-DPO's train.py
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, data: bytes):
        from PIL import Image
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))

    def __getitem__(self, i: int):
        import torch
        row = self.rows[i % len(self.rows)]
        first, second = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        ids = self.tokenizer(row["caption"], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return torch.cat([self.image(row[first]), self.image(row[second])], 0), ids


def python_worker(args: argparse.Namespace) -> int:
    """Runs Diffusion-DPO's training step for --steps optimizer steps; writes step times as JSON."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe, device = Path(args.pipeline), torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight_dtype = torch.float16 if cuda else torch.float32  # Diffusion-DPO: frozen models in half on GPU
    tokenizer = CLIPTokenizer.from_pretrained(pipe / "tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(pipe / "scheduler")
    text_encoder = CLIPTextModel.from_pretrained(pipe / "text_encoder").to(device, weight_dtype).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(pipe / "vae").to(device, weight_dtype).requires_grad_(False)
    ref_unet = UNet2DConditionModel.from_pretrained(pipe / "unet").to(device, weight_dtype).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(pipe / "unet").to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    data = PickapicPairs(Path(args.parquet), tokenizer, args.resolution)
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=True, num_workers=args.workers,
                                         drop_last=True, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    accumulation = args.global_batch  # micro-batch 1
    step_seconds = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            try:
                pixel_values, input_ids = next(batches)
            except StopIteration:
                batches = iter(loader)
                pixel_values, input_ids = next(batches)
            pixel_values, input_ids = pixel_values.to(device, non_blocking=True), input_ids.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                feed = torch.cat(pixel_values.chunk(2, dim=1))  # [w; l]
                with torch.no_grad():
                    latents = vae.encode(feed.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
                    hidden = text_encoder(input_ids)[0].repeat(2, 1, 1)
                noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
                bsz = latents.shape[0] // 2
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).repeat(2)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                model_pred = unet(noisy, timesteps, hidden).sample
                model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
                model_w, model_l = model_losses.chunk(2)
                with torch.no_grad():
                    ref_pred = ref_unet(noisy, timesteps, hidden).sample.detach()
                    ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
                    ref_w, ref_l = ref_losses.chunk(2)
                inside = -0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))
                loss = -F.logsigmoid(inside).mean()
            scaler.scale(loss / accumulation).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        print(f"python loop: step {len(step_seconds)} {step_seconds[-1]:.3f} s loss {loss.item():.4f}", flush=True)
    result = {"step_seconds": step_seconds}
    if cuda:
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- measuring a child process

def tree_rss_kib(pid: int) -> int:
    """RSS of pid and all its descendants, from /proc (kB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def gpu_used_mib(pid: int) -> float:
    """GPU memory nvidia-smi reports for pid (context + caching allocator), 0 if none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    used = 0.0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            used += float(parts[1])
    return used


def run_watched(cmd: list[str], env: dict, log: Path, timeout: float, cuda: bool) -> dict:
    """Runs cmd; polls its tree's RSS (and GPU memory); returns wall time and the peaks."""
    start = time.monotonic()
    peaks = {"tree": 0, "gpu": 0.0}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def poll_gpu() -> None:
            while not stop.wait(0.5):
                peaks["gpu"] = max(peaks["gpu"], gpu_used_mib(proc.pid))

        watcher = threading.Thread(target=poll_gpu, daemon=True)
        if cuda:
            watcher.start()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peaks["tree"] = max(peaks["tree"], tree_rss_kib(proc.pid))
            if time.monotonic() - start > timeout:
                proc.kill()
                stop.set()
                raise SystemExit(f"bench: {' '.join(cmd)} ran past {timeout:.0f} s (log {log})")
            time.sleep(0.05)
        stop.set()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"bench: {cmd[0]} exited {rc}:\n{log.read_text()[-4000:]}")
    return {"wall_s": time.monotonic() - start, "peak_tree_rss_mib": peaks["tree"] / 1024.0,
            "ru_maxrss_mib": usage.ru_maxrss / 1024.0, "peak_gpu_used_mib": peaks["gpu"] if cuda else None}


# ---------------------------------------------------------------- the two sides

def dde_config(paths: dict, args: argparse.Namespace, run_dir: Path) -> Path:
    cfg = f"""run: {{output_dir: {run_dir}, seed: 0, device: {args.device}}}
model: {{manifest: {paths['export'] / 'manifest.json'}}}
data: {{index: {paths['shards'] / 'index.json'}, shuffle_buffer: 64, workers: {args.workers}}}
method: {{name: uniform, beta: {BETA}}}
optim: {{lr: {LR}, warmup_steps: 0, grad_clip: 1.0}}
train: {{global_batch: {args.global_batch}, micro_batch: {args.dde_micro_batch}, max_steps: {args.steps},
        precision: {args.dde_precision}}}
checkpoint: {{every: {args.steps}, keep: 1}}
logging: {{per_sample: false, progress: false}}
"""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(cfg)
    return path


def run_dde(paths: dict, args: argparse.Namespace, tag: str, env: dict, sets: tuple[str, ...] = ()) -> dict:
    run_dir = Path(args.work) / "runs" / tag
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(args.build) / "dde_train"), "--config", str(dde_config(paths, args, run_dir))]
    for s in [*args.dde_set, *sets]:
        cmd += ["--set", s]
    watched = run_watched(cmd, env, run_dir.parent / f"{tag}.log", args.timeout, args.device == "cuda")
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [args.global_batch / s["pairs_per_s"] for s in steps if s.get("kind") == "step"]
    return {**watched, "step_seconds": seconds}


def encode_cache(paths: dict, args: argparse.Namespace, env: dict) -> dict:
    """dde_encode_cache over the bench's shards, once (timed): the cache the cached rows train from."""
    cache = Path(args.work) / "latent_cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    (Path(args.work) / "runs").mkdir(parents=True, exist_ok=True)
    config = dde_config(paths, args, Path(args.work) / "runs" / "encode-cache")
    cmd = [str(Path(args.build) / "dde_encode_cache"), "--config", str(config), "--out", str(cache),
           "--batch", str(args.cache_batch)]
    watched = run_watched(cmd, env, Path(args.work) / "runs" / "encode-cache.log", args.timeout, args.device == "cuda")
    index = json.loads((cache / "index.json").read_text())
    pairs = sum(int(s.get("pairs", 0)) for s in index.get("shards", []))
    return {**watched, "index": str(cache / "index.json"), "pairs": pairs}


def run_python(paths: dict, args: argparse.Namespace, tag: str, env: dict) -> dict:
    result = Path(args.work) / "runs" / f"{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", "python", "--pipeline", str(paths["pipeline"]),
           "--parquet", str(paths["parquet"]), "--result", str(result), "--device", args.device,
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--global-batch",
           str(args.global_batch), "--workers", str(args.workers), "--threads", str(args.threads or 0)]
    watched = run_watched(cmd, env, result.with_suffix(".log"), args.timeout, args.device == "cuda")
    return {**watched, **json.loads(result.read_text())}


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    """Median run by pairs/s over the steps after the warm-up."""
    for r in runs:
        measured = r["step_seconds"][args.warmup:]
        r["pairs_per_s"] = args.global_batch * len(measured) / sum(measured)
    best = sorted(runs, key=lambda r: r["pairs_per_s"])[len(runs) // 2]
    keys = ["pairs_per_s", "peak_tree_rss_mib", "ru_maxrss_mib", "peak_gpu_used_mib", "max_memory_allocated_mib"]
    return {k: best.get(k) for k in keys} | {"pairs_per_s_all": [r["pairs_per_s"] for r in runs]}


def count_flops_per_pair(pipeline: Path, resolution: int, device: str) -> dict:
    """FLOPs of one DPO pair from FlopCounterMode on the diffusers modules (batch 1 each):
    policy fwd+bwd on 2 images (3 forwards each), reference fwd on 2, VAE encode of 2."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").to(device)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").to(device)
    h = resolution // 8
    x = torch.randn(1, 4, h, h, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), text)
    unet_fwd = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.randn(1, 3, resolution, resolution, device=device))
    vae_enc = counter.get_total_flops()
    per_pair = 2 * 3 * unet_fwd + 2 * unet_fwd + 2 * vae_enc
    return {"unet_forward_flop": unet_fwd, "vae_encode_flop": vae_enc, "pair_flop": per_pair,
            "pair_flop_cached_latents": per_pair - 2 * vae_enc}


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(result: dict) -> str:
    d, p, r = result["dde_train"], result["python_loop"], result["ratio_dde_over_python"]
    mem = "peak_gpu_used_mib" if result["device"] == "cuda" else "peak_tree_rss_mib"
    lines = ["| side | pairs/s | peak RSS MiB (tree) | main ru_maxrss MiB |" + (" GPU used MiB |" if mem != "peak_tree_rss_mib" else ""),
             "| --- | --- | --- | --- |" + (" --- |" if mem != "peak_tree_rss_mib" else "")]
    sides = [("dde_train", d), ("python loop", p)]
    if "dde_train_cache" in result:
        sides.insert(1, ("dde_train, latent cache", result["dde_train_cache"]))
    for name, s in sides:
        row = f"| {name} | {s['pairs_per_s']:.3f} | {s['peak_tree_rss_mib']:.0f} | {s['ru_maxrss_mib']:.0f} |"
        if mem != "peak_tree_rss_mib":
            row += f" {s['peak_gpu_used_mib']:.0f} |"
        lines.append(row)
    lines.append(f"| dde / python | {r['pairs_per_s']:.2f}x | {r['peak_tree_rss_mib']:.2f}x | "
                 f"{r['ru_maxrss_mib']:.2f}x |" + (f" {r['peak_gpu_used_mib']:.2f}x |" if mem != "peak_tree_rss_mib" else ""))
    if "ratio_dde_cache_over_python" in result:
        r = result["ratio_dde_cache_over_python"]
        lines.append(f"| dde (cache) / python | {r['pairs_per_s']:.2f}x | {r['peak_tree_rss_mib']:.2f}x | "
                     f"{r['ru_maxrss_mib']:.2f}x |" + (f" {r['peak_gpu_used_mib']:.2f}x |" if mem != "peak_tree_rss_mib" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: mid on cpu, full on cuda")
    parser.add_argument("--resolution", type=int, help="default: the size's")
    parser.add_argument("--rounds", type=int, default=2, help="alternations dde/python (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out (default 2)")
    parser.add_argument("--global-batch", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--dde-micro-batch", type=int, default=1, help="dde_train's micro-batch (default 1)")
    parser.add_argument("--dde-precision", choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--dde-set", action="append", default=[], help="extra --set for dde_train")
    parser.add_argument("--workers", type=int, default=2, help="data workers of both sides (default 2)")
    parser.add_argument("--threads", type=int, help="intra-op threads of both sides (OMP_NUM_THREADS)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_vs_dpo")
    parser.add_argument("--build", type=Path, default=Path(os.environ.get("DDE_BUILD_DIR", ROOT / "build")))
    parser.add_argument("--out", type=Path, help="JSON result (default bench/results/vs_diffusion_dpo-<date>-<device>.json)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    parser.add_argument("--rows", type=int, default=512, help="parquet rows (default 512)")
    parser.add_argument("--dde-cache", action="store_true",
                        help="also encode a latent cache (dde_encode_cache, timed) and run dde_train from it")
    parser.add_argument("--cache-batch", type=int, default=4,
                        help="dde_encode_cache --batch: pairs per encoder call (default 4)")
    # worker mode (the Python loop in its own process, so its memory is measured alone)
    parser.add_argument("--worker", choices=["python"], help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "python":
        return python_worker(args)

    cuda = args.device == "cuda"
    args.size = args.size or ("full" if cuda else "mid")
    args.resolution = args.resolution or SIZES[args.size]["resolution"]
    args.dde_precision = args.dde_precision or ("bf16" if cuda else "fp32")
    if args.global_batch % args.dde_micro_batch:
        raise SystemExit(f"bench: --global-batch {args.global_batch} is not a multiple of --dde-micro-batch")
    if not (Path(args.build) / "dde_train").is_file():
        raise SystemExit(f"bench: {args.build}/dde_train not built: run scripts/build.sh first")
    paths = prepare(Path(args.work), args.size, args.rows)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    dde_runs, py_runs, cached_runs = [], [], []
    cache = encode_cache(paths, args, env) if args.dde_cache else None
    for k in range(args.rounds):
        if cache:
            cached_runs.append(run_dde(paths, args, f"dde-cache-{k}", env, (f"data.cache={cache['index']}",)))
        dde_runs.append(run_dde(paths, args, f"dde-{k}", env))
        print(f"bench: round {k}: dde_train {args.global_batch * len(dde_runs[-1]['step_seconds'][args.warmup:]) / sum(dde_runs[-1]['step_seconds'][args.warmup:]):.3f} pairs/s", flush=True)
        py_runs.append(run_python(paths, args, f"python-{k}", env))
        print(f"bench: round {k}: python  {args.global_batch * len(py_runs[-1]['step_seconds'][args.warmup:]) / sum(py_runs[-1]['step_seconds'][args.warmup:]):.3f} pairs/s", flush=True)
    d, p = summarize(dde_runs, args), summarize(py_runs, args)
    ratio = {k: (d[k] / p[k] if d.get(k) and p.get(k) else None)
             for k in ("pairs_per_s", "peak_tree_rss_mib", "ru_maxrss_mib", "peak_gpu_used_mib")}
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
        "command": " ".join([Path(sys.executable).name, "bench/vs_diffusion_dpo.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "device": args.device, "size": args.size, "resolution": args.resolution, "unet_block_out_channels": SIZES[args.size]["unet"],
        "global_batch": args.global_batch, "dde_micro_batch": args.dde_micro_batch, "python_micro_batch": 1,
        "dde_precision": args.dde_precision, "python_precision": "fp16 autocast" if cuda else "fp32",
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "workers": args.workers, "threads": args.threads,
        "dde_set": args.dde_set, "dde_train": d, "python_loop": p, "ratio_dde_over_python": ratio,
        "runs": {"dde_train": dde_runs, "python_loop": py_runs},
    }
    if cache:
        c = summarize(cached_runs, args)
        result["dde_train_cache"] = c
        result["ratio_dde_cache_over_python"] = {k: (c[k] / p[k] if c.get(k) and p.get(k) else None)
                                                 for k in ("pairs_per_s", "peak_tree_rss_mib", "ru_maxrss_mib",
                                                           "peak_gpu_used_mib")}
        result["cache_encode"] = cache
        result["runs"]["dde_train_cache"] = cached_runs
    if cuda:
        flops = count_flops_per_pair(paths["pipeline"], args.resolution, "cuda")
        result["flops"] = flops | {"peak_tflops_bf16": BF16_PEAK_TFLOPS}
        for side in ("dde_train", "python_loop", "dde_train_cache"):
            if side not in result:
                continue
            pair_flop = flops["pair_flop_cached_latents" if side == "dde_train_cache" else "pair_flop"]
            tflops = result[side]["pairs_per_s"] * pair_flop / 1e12
            result[side]["tflops"] = tflops
            result[side]["mfu"] = tflops / BF16_PEAK_TFLOPS
    out = args.out or ROOT / "bench" / "results" / f"vs_diffusion_dpo-{dt.date.today().isoformat()}-{args.device}{'-cache' if args.dde_cache else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
