#!/usr/bin/env bash
# The GPU check of dde on a machine with an H100/H200, CUDA 13, python3 with torch 2.11.0, CMake
# and a compiler, but none of our C++ -dev libraries and no network. Phases (default: all, in order):
#   deps   unpack .debs/*.deb (bench/fetch_debs.sh) into a prefix; pip-install .whl/*.whl (the Python
#          packages the image lacks or has at other versions) into a target folder
#   build  configure + build the CUDA binary and tests against python3's torch into build-cuda/
#   ctest  the C++ tests with CUDA present: fails if any test fails or is skipped
#   e2e    a tiny run on CUDA of all six methods, sd15 and sdxl (fp32, and bf16 for dde)
#   nccl   the NCCL process group at world size 1 (dist.force_process_group), LOCAL_RANK=3 with one
#          visible GPU (must pick cuda:0)
#   sync   CUDA sync debug mode "error" inside the micro-batch loop (run.cuda_sync_debug=error),
#          from the images (uint8, pinned) and from a latent cache: a host sync there aborts the run
#   full   full-size SD1.5 (random weights, 512 px), bf16, gradient checkpointing, 2 steps
#   bench  bench/vs_diffusion_dpo.py --device cuda (pairs/s, memory, MFU)
# Everything goes to $OUT (default runs/gpu_check): summary.txt (one PASS/FAIL line per check),
# logs.tar.gz (every log), and the benchmark's JSON. The device tool returns at most 8 files and
# runs at most 10 minutes per call, with build outputs kept while the machine stays warm, so run it
# as two calls:  bash bench/gpu_check.sh deps build ctest e2e nccl sync   then
#                bash bench/gpu_check.sh deps full bench
# (carry: .debs and .whl). Expected durations on an H200 (16 cores): deps <1 min, build 3-6 min,
# ctest ~1, e2e ~2, nccl+sync ~1, full ~3 (export of the full-size pipeline), bench ~4.
#
#   bash bench/gpu_check.sh --dry-run [phases]
# runs here, on the CPU, what needs no GPU: unpacks the debs and configures a build against them
# (no compile: the existing build/ is used), the C++ dist/device tests, the tiny runs on the CPU,
# Gloo at world size 1 in place of NCCL, the sync-debug key (a no-op on the CPU), and the benchmark
# at its tiny size. It checks the script's plumbing, not the GPU.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

dry_run=0
phases=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    deps | build | ctest | e2e | nccl | sync | full | bench) phases+=("$arg") ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (phases: deps build ctest e2e nccl sync full bench)" >&2; exit 2 ;;
  esac
done
((${#phases[@]})) || phases=(deps build ctest e2e nccl sync full bench)
((dry_run)) && phases=("${phases[@]/full/}")  # the full-size step needs a GPU

out="${OUT:-$root/runs/gpu_check}"
mkdir -p "$out"
logs="$(mktemp -d /tmp/gpu_check.XXXXXX)"
summary="$out/summary.txt"
prefix="/tmp/dde-debs"
site="/tmp/dde-site"
device=cuda
build="$root/build-cuda"
if ((dry_run)); then
  device=cpu
  build="${DDE_BUILD_DIR:-$root/build}"
fi
export DDE_BUILD_DIR="$build" PYTHONUNBUFFERED=1
fixtures="$root/fixtures"
failures=0

note() { echo "$*" | tee -a "$summary"; }
# check NAME CMD...: runs CMD with its output in $logs/NAME.log, records PASS/FAIL with the time.
check() {
  local name="$1"; shift
  local start=$SECONDS
  echo "gpu_check: $name ..."
  if "$@" >"$logs/$name.log" 2>&1; then
    note "PASS $name ($((SECONDS - start)) s)"
  else
    note "FAIL $name ($((SECONDS - start)) s): last lines of $name.log:"
    tail -n 15 "$logs/$name.log" | sed 's/^/    /' | tee -a "$summary"
    failures=$((failures + 1))
  fi
}
finish() {
  cp "$build/CMakeCache.txt" "$logs/" 2>/dev/null
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
  note "gpu_check: $failures failed check(s); logs in $out/logs.tar.gz"
}
trap finish EXIT

python_bin() {
  if [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"; else command -v python3; fi
}

# ---------------------------------------------------------------------------- phases

unpack_debs() {
  local debs=("$root"/.debs/*.deb)
  [ -e "${debs[0]}" ] || { echo "no .debs/*.deb: run bash bench/fetch_debs.sh here and carry .debs"; return 1; }
  rm -rf "$prefix" && mkdir -p "$prefix"
  for deb in "${debs[@]}"; do
    if command -v dpkg-deb >/dev/null 2>&1; then
      dpkg-deb -x "$deb" "$prefix" || return 1
    else  # a .deb is an ar archive holding data.tar.*
      (cd "$prefix" && ar p "$deb" "$(ar t "$deb" | grep '^data.tar')" | tar -x -a -f - 2>/dev/null ||
        ar p "$deb" "$(ar t "$deb" | grep '^data.tar')" | tar -xJ -f -) || return 1
    fi
    echo "unpacked $(basename "$deb")"
  done
  # Debian's -dev symlinks are absolute (/usr/lib/...): re-point them into the prefix.
  find "$prefix" -type l | while read -r link; do
    target="$(readlink "$link")"
    case "$target" in /*) ln -sfn "$prefix$target" "$link" ;; esac
  done
  ls "$prefix/usr/lib/x86_64-linux-gnu/cmake"
}

install_wheels() {
  if ((dry_run)); then echo "dry run: the .venv has the pinned packages"; return 0; fi
  local wheels=("$root"/.whl/*.whl)
  [ -e "${wheels[0]}" ] || { echo "no .whl/*.whl: run bash bench/fetch_debs.sh here and carry .whl"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || return 1
  PYTHONPATH="$site" python3 -c 'import diffusers, transformers, torch; print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
}

phase_deps() {
  check deps_unpack unpack_debs
  check deps_wheels install_wheels
}

env_setup() {
  export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="/usr/local/cuda/bin:$PATH"
  if ((!dry_run)); then
    export PYTHONPATH="$site:$root/scripts${PYTHONPATH:+:$PYTHONPATH}"
    # The repository's scripts call .venv/bin/python: point it at the image's python3.
    if [ ! -x "$root/.venv/bin/python" ]; then
      mkdir -p "$root/.venv/bin" && ln -sf "$(command -v python3)" "$root/.venv/bin/python"
    fi
  fi
}

configure() {
  local dir="$1"; shift
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  cmake -S "$root" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix/usr" -DDDE_PYTHON="$(python_bin)" \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 "$@" || return 1
  # Every -dev package must come from the prefix, not from the system.
  for pkg in yaml-cpp spdlog GTest CLI11 nlohmann_json; do
    grep -E "^${pkg}_DIR" "$dir/CMakeCache.txt"
    grep -qE "^${pkg}_DIR:PATH=$prefix" "$dir/CMakeCache.txt" || { echo "$pkg not from $prefix"; return 1; }
  done
  grep -q "DDE_WITH_NCCL\|USE_C10D_NCCL" "$dir/CMakeFiles/dde_core.dir/flags.make" 2>/dev/null ||
    grep -rq "DDE_WITH_NCCL" "$dir/build.ninja" 2>/dev/null || { echo "no NCCL in this build"; return 1; }
}

phase_build() {
  if ((dry_run)); then
    # Configure only (a full compile takes 20 min here); the tests below use the existing build/.
    check build_configure configure "$(mktemp -d /tmp/gpu_check_build.XXXXXX)" -DDDE_WERROR=OFF
    return
  fi
  # A newer compiler than Debian 12's may warn where ours does not: warnings are not errors here.
  check build_configure configure "$build" -DDDE_WERROR=OFF
  check build_compile cmake --build "$build" -j"$(nproc)"
  check fixtures bash scripts/prepare_tiny.sh
}

run_ctest() {
  local filter=()
  ((dry_run)) && filter=(--gtest_filter='Communicator.*:DistDevice.*:CorrectionEma*')
  "$build/tests/cpp/dde_tests" "${filter[@]}" 2>&1 | tee "$logs/ctest.log.raw"
  local rc=${PIPESTATUS[0]}
  ((rc == 0)) || return "$rc"
  if ((!dry_run)) && grep -q "\[  SKIPPED \]" "$logs/ctest.log.raw"; then
    echo "tests were skipped on the GPU machine:"; grep "\[  SKIPPED \]" "$logs/ctest.log.raw"; return 1
  fi
}

phase_ctest() {
  [ -d "$fixtures/shards" ] || bash scripts/prepare_tiny.sh >"$logs/fixtures.log" 2>&1
  check ctest run_ctest
}

# train NAME FAMILY [--set ...]: a tiny run of dde_train on the fixtures; checks finite losses.
train() {
  local name="$1" family="$2"; shift 2
  local run="$logs/runs/$name"
  rm -rf "$run"
  "$build/dde_train" --config configs/tiny_dde.yaml \
    --set model.manifest="$fixtures/export/$family/manifest.json" \
    --set data.index="$fixtures/shards/$family/index.json" --set run.output_dir="$run" \
    --set data.eval_index="$fixtures/shards/${family}_eval/index.json" --set eval.every=3 \
    --set run.device="$device" --set train.max_steps=3 --set checkpoint.every=3 "$@" || return 1
  "$(python_bin)" - "$run/metrics.jsonl" <<'EOF'
import json, math, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"step"' in l.replace(" ", "")]
assert len(steps) == 3, f"{len(steps)} step records"
assert all(math.isfinite(s["loss"]) and s["skipped_steps"] == 0 for s in steps), steps
print("losses", [round(s["loss"], 5) for s in steps], "pairs/s", [round(s["pairs_per_s"], 1) for s in steps])
EOF
}

log_has() {  # log_has NAME PATTERN: run NAME's train.log or terminal output (check NAME's log) has PATTERN
  grep -q "$2" "$logs/runs/$1/train.log" "$logs/$1.log" 2>/dev/null ||
    { echo "'$2' in neither $1/train.log nor $1.log"; return 1; }
}

phase_e2e() {
  [ -d "$fixtures/shards" ] || bash scripts/prepare_tiny.sh >"$logs/fixtures.log" 2>&1
  local want="device cpu"
  ((dry_run)) || want="device cuda:0"
  for family in sd15 sdxl; do
    for method in sft uniform discounted dde_single dde_step dde; do
      check "e2e_${family}_${method}" train "e2e_${family}_${method}" "$family" --set method.name="$method"
      check "e2e_${family}_${method}_on_$device" log_has "e2e_${family}_${method}" "$want"
    done
    check "e2e_${family}_dde_bf16" train "e2e_${family}_dde_bf16" "$family" --set train.precision=bf16
  done
}

# One visible GPU and LOCAL_RANK 3 (a launcher that isolates each task's GPU): must use cuda:0.
train_one_visible_gpu() {
  CUDA_VISIBLE_DEVICES=0 LOCAL_RANK=3 RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 \
    train "$@"
}

phase_nccl() {
  local backend=nccl
  ((dry_run)) && backend=gloo
  check nccl_world_of_one train nccl_world_of_one sd15 --set dist.force_process_group=true \
    --set logging.per_sample=true
  check nccl_world_of_one_backend log_has nccl_world_of_one "backend $backend"
  if ((!dry_run)); then
    check nccl_one_visible_gpu train_one_visible_gpu nccl_one_visible_gpu sd15 \
      --set dist.force_process_group=true
    check nccl_one_visible_gpu_device log_has nccl_one_visible_gpu "device cuda:0"
  fi
}

# train_from_cache NAME FAMILY [--set ...]: encodes the tiny shards into a latent cache, then
# `train`s from it (the loader's pinned moments and embeddings in place of the uint8 images).
train_from_cache() {
  local name="$1" family="$2"; shift 2
  local cache="$logs/runs/${name}_cache"
  rm -rf "$cache"
  "$build/dde_encode_cache" --config configs/tiny_dde.yaml \
    --set model.manifest="$fixtures/export/$family/manifest.json" \
    --set data.index="$fixtures/shards/$family/index.json" --set run.device="$device" \
    --out "$cache" || return 1
  train "$name" "$family" --set data.cache="$cache/index.json" "$@"
}

phase_sync() {
  for family in sd15 sdxl; do
    check "sync_debug_${family}" train "sync_${family}" "$family" --set run.cuda_sync_debug=error \
      --set logging.per_sample=true
    check "sync_debug_${family}_bf16" train "sync_${family}_bf16" "$family" \
      --set run.cuda_sync_debug=error --set train.precision=bf16
    check "sync_debug_${family}_cache" train_from_cache "sync_${family}_cache" "$family" \
      --set run.cuda_sync_debug=error --set train.precision=bf16
  done
}

full_step() {
  local py
  py="$(python_bin)"
  "$py" - <<'EOF' || return 1
import sys, pathlib
sys.path.insert(0, "bench"); sys.path.insert(0, "scripts")
import vs_diffusion_dpo as b
print(b.prepare(pathlib.Path("runs/bench_vs_dpo"), "full", 512))
EOF
  local base="$root/runs/bench_vs_dpo/full" run="$logs/runs/full_bf16"
  "$build/dde_train" --config configs/sd15_dde.yaml --set model.manifest="$base/export/manifest.json" \
    --set data.index="$base/shards/index.json" --set run.output_dir="$run" --set run.device=cuda \
    --set train.precision=bf16 --set train.gradient_checkpointing=true --set train.global_batch=4 \
    --set train.micro_batch=4 --set train.max_steps=2 --set checkpoint.every=2 --set optim.warmup_steps=0 \
    --set data.shuffle_buffer=64 || return 1
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  cat "$run/metrics.jsonl"
}

phase_full() {
  check full_sd15_bf16_checkpointing full_step
}

run_bench() {
  if ((dry_run)); then
    "$(python_bin)" bench/vs_diffusion_dpo.py --device cpu --size tiny --rounds 1 --steps 3 --warmup 1 \
      --global-batch 2 --threads 1 --dde-cache --work "$root/runs/bench_vs_dpo" --out "$out/vs_diffusion_dpo-dry-run.json"
  else
    "$(python_bin)" bench/vs_diffusion_dpo.py --device cuda --size full --rounds 1 --steps 6 --warmup 2 \
      --global-batch 8 --dde-micro-batch 8 --workers 8 --dde-cache --cache-batch 16 --work "$root/runs/bench_vs_dpo" \
      --out "$out/vs_diffusion_dpo-cuda.json"
  fi
}

phase_bench() {
  check bench run_bench
}

# ---------------------------------------------------------------------------- main

: >"$summary"
note "gpu_check $(date -u +%FT%TZ) on $(hostname) ($(git rev-parse --short HEAD 2>/dev/null)), dry run $dry_run, phases: ${phases[*]}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"
env_setup
for phase in "${phases[@]}"; do
  [ -n "$phase" ] && "phase_$phase"
done
((failures == 0))
