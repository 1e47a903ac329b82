#!/usr/bin/env bash
# The GPU check of dde, on a fresh GPU machine (CUDA driver, python3 with torch 2.11.0+cu130, none of
# our C++ libraries, no network) in at most 8 minutes, from a bundle made here: nothing is built
# there. Here:   bash bench/make_gpu_bundle.sh           (gpu_bundle/: binaries, libs, wheels, fixtures)
# There (the device tool's `run`, carrying gpu_bundle, from the repository root):
#                bash gpu_bundle/gpu_check.sh [phases]
# Phases (default: all, in this order), each under `timeout` with its own budget, and the whole
# under a total budget: a phase gets min(its budget, what is left of the total). A failed or timed
# out phase does not stop the later ones.
#   setup  a Python environment for the check (the machine's python3 + the bundle's pinned wheels,
#          in a venv that sees the machine's site-packages), LD_LIBRARY_PATH = the bundle's lib/ +
#          torch's and NVIDIA's lib folders, `ldd` of every binary (nothing unresolved), the source
#          path compiled into dde_tests (configs/); then the full-size SD1.5 pipeline (random
#          weights, 512 px) is made and exported in the background, on the CPU, for `full` and `bench`
#   ctest  the C++ tests (dde_tests, dde_fake_device_tests) with CUDA present: fails if any test
#          fails or is skipped
#   e2e    the tiny runs on CUDA of all six methods, sd15 and sdxl (fp32, and bf16 for dde)
#   nccl   the NCCL process group at world size 1 (dist.force_process_group), and LOCAL_RANK=3 with
#          one visible GPU (must pick cuda:0)
#   sync   run.cuda_sync_debug=error inside the micro-batch loop, from the images (fp32, bf16) and
#          from a latent cache (dde_encode_cache): a host sync there aborts the run
#   full   one full-size SD1.5 step, bf16, train.gradient_checkpointing=true, micro-batch 4
#   one_gpu  full fine-tune, LoRA rank 8, mapo, mapo + LoRA on the same pipeline: peak and pairs/s
#   bench  bench/vs_diffusion_dpo.py --device cuda --size full --dde-cache (pairs/s, memory, MFU)
# Budgets (s) on the GPU: setup 35, ctest 50, e2e 60, nccl 30, sync 40, full 100, one_gpu 150,
# bench 135; total 600 (the background export has from the end of setup to the end of `full`,
# about 4.5 minutes).
# $OUT (default runs/gpu_check) gets three files: summary.txt (one PASS/FAIL/TIMEOUT line per phase
# with its seconds, then its checks, indented), logs.tar.gz (every log) and the benchmark's JSON.
#
#   bash bench/gpu_check.sh --dry-run [phases]
# runs here, on the CPU: makes a bundle from build/ into a temporary folder (no wheels: the .venv
# has the pinned packages) and runs that bundle's copy of this script as the GPU machine would,
# with run.device=cpu: the Python environment, the ldd check (every library from the bundle, the
# .venv's torch, or glibc/libstdc++), a few C++ tests, the tiny runs, Gloo at world size 1 in place
# of NCCL, the sync-debug key (a no-op on the CPU), the full-size step's command on the `tiny`
# pipeline, and the benchmark at its tiny size. It checks the plumbing, not the GPU.
# DDE_GPU_BUNDLE=DIR uses that bundle instead (e.g. gpu_bundle, to dry-run what will be carried).
set -uo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
here="$(dirname "$self")"

all_phases=(setup ctest e2e nccl sync full one_gpu bench)
dry_run=0
worker=""
phases=()
args=("$@")
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --worker) worker="${2:-}"; shift ;;
    setup | ctest | e2e | nccl | sync | full | one_gpu | bench) phases+=("$1") ;;
    -h | --help) sed -n '2,36p' "$self"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (phases: ${all_phases[*]})" >&2; exit 2 ;;
  esac
  shift
done

# ---------------------------------------------------------------------------- not in a bundle
# bench/gpu_check.sh hands over to a bundle's copy of itself (a fresh one for a dry run).
if [ ! -f "$here/bundle.env" ]; then
  root="$(cd "$here/.." && pwd)"
  if ((dry_run)) && [ -z "${DDE_GPU_BUNDLE:-}" ]; then
    tmp="$(mktemp -d /tmp/gpu_check_bundle.XXXXXX)"
    trap 'rm -rf "$tmp"' EXIT
    start=$SECONDS
    if ! bash "$root/bench/make_gpu_bundle.sh" --out "$tmp/gpu_bundle" --no-wheels >"$tmp/make.log" 2>&1; then
      out="${OUT:-$root/runs/gpu_check}"
      mkdir -p "$out"
      { echo "FAIL make_gpu_bundle ($((SECONDS - start)) s):"; tail -n 20 "$tmp/make.log" | sed 's/^/    /'; } |
        tee "$out/summary.txt"
      exit 1
    fi
    DDE_GC_PRELUDE="PASS make_gpu_bundle ($((SECONDS - start)) s): $(tail -n 1 "$tmp/make.log" | sed 's/^make_gpu_bundle: //')" \
      DDE_GC_ROOT="$root" bash "$tmp/gpu_bundle/gpu_check.sh" "${args[@]}"
    exit $?
  fi
  bundle="${DDE_GPU_BUNDLE:-$root/gpu_bundle}"
  [ -f "$bundle/gpu_check.sh" ] || { echo "gpu_check: no bundle in $bundle: run bash bench/make_gpu_bundle.sh" >&2; exit 1; }
  DDE_GC_ROOT="$root" exec bash "$bundle/gpu_check.sh" "${args[@]}"
fi

# ---------------------------------------------------------------------------- in a bundle
bundle="$here"
# shellcheck source=/dev/null
. "$bundle/bundle.env"
root="${DDE_GC_ROOT:-}"
if [ -z "$root" ]; then
  if [ -f "$PWD/configs/tiny_dde.yaml" ]; then root="$PWD"; else root="$(cd "$bundle/.." && pwd)"; fi
fi
[ -f "$root/configs/tiny_dde.yaml" ] || { echo "gpu_check: run it from the repository root (no configs/ in $root)" >&2; exit 1; }
cd "$root" || exit 1
fixtures="$bundle/fixtures"
device=cuda
jobs=4                   # tiny runs at a time on the one GPU
size=full rows=128       # the full-size pipeline of `full` and `bench`
if ((dry_run)); then
  device=cpu jobs=1 size=tiny
fi
declare -A budget=([setup]=35 [ctest]=50 [e2e]=60 [nccl]=30 [sync]=40 [full]=100 [one_gpu]=150 [bench]=135)
total=600
if ((dry_run)); then  # a loaded 2-core CPU: generous, the dry run is not timed
  budget=([setup]=120 [ctest]=300 [e2e]=900 [nccl]=300 [sync]=600 [full]=600 [one_gpu]=900 [bench]=900)
  total=3600
fi

# check NAME CMD...: runs CMD with its output in $logs/NAME.log and appends a PASS/FAIL line (with
# the last lines of the log on failure) to this phase's checks file.
check() {
  local check_name="$1"; shift
  local check_start=$SECONDS check_line
  if "$@" >"$logs/$check_name.log" 2>&1; then
    check_line="  PASS $check_name ($((SECONDS - check_start)) s)"
  else
    check_line="  FAIL $check_name ($((SECONDS - check_start)) s): last lines of $check_name.log:"$'\n'"$(tail -n 12 "$logs/$check_name.log" | sed 's/^/      /')"
  fi
  printf '%s\n' "$check_line" >>"$checks"
  [[ "$check_line" == "  PASS"* ]]
}
# spawn CMD...: runs CMD in the background, at most $jobs at a time (in the foreground if 1).
spawn() {
  if ((jobs <= 1)); then "$@"; return 0; fi
  while (($(jobs -rp | wc -l) >= jobs)); do sleep 0.2; done
  "$@" &
}

# ---------------------------------------------------------------------------- the phases (workers)

phase_setup() {
  check setup_python make_python
  # shellcheck source=/dev/null
  . "$work/env.sh" 2>/dev/null
  check setup_libraries find_libraries
  # shellcheck source=/dev/null
  . "$work/env.sh" 2>/dev/null
  check setup_ldd ldd_check
  check setup_source_dir link_source_dir
}

# A venv over the machine's python3 (its site-packages, torch included, through a .pth) with the
# bundle's wheels installed in the venv itself, so that they come first, also for the Python
# subprocesses of bench/vs_diffusion_dpo.py (which set their own PYTHONPATH).
make_python() {
  local base="${DDE_GC_PYTHON:-python3}"
  ((dry_run)) && base="${DDE_GC_PYTHON:-$root/.venv/bin/python}"
  local venv="$work/py"
  rm -rf "$venv"
  "$base" -m venv --without-pip "$venv" || return 1
  local vsite
  vsite="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')" || return 1
  "$base" - "$vsite" <<'EOF' || return 1
import sys, site
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
with open(sys.argv[1] + "/zz_dde_machine_site.pth", "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
print("machine site-packages:", dirs)
EOF
  local wheels=("$bundle"/wheels/*.whl)
  if [ -e "${wheels[0]}" ]; then
    timeout 60 "$base" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --target "$vsite" "${wheels[@]}" || return 1
  fi
  local py="$venv/bin/python"
  { printf 'export DDE_GC_PY=%q\n' "$py"
    printf 'export PYTHONPATH=%q\n' "$root/scripts"; } >"$work/env.sh"
  "$py" - <<'EOF' || return 1
import sys, torch, diffusers, transformers, tokenizers, huggingface_hub
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in (diffusers, transformers, tokenizers, huggingface_hub):
    print(m.__name__, m.__version__, m.__file__)
EOF
  if ((!dry_run)); then
    "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' || return 1
  fi
}

# LD_LIBRARY_PATH: the bundle's lib/, torch's lib/ and the NVIDIA wheels' lib/ folders beside it,
# and lib-extra/ (unpacked) only if this machine lacks one of its libraries (libcrypto, libssl, libz,
# ICU's).
find_libraries() {
  local torch_path
  torch_path="$("$DDE_GC_PY" -c 'import glob, os, torch
t = os.path.dirname(torch.__file__)
print(":".join([t + "/lib"] + sorted(glob.glob(os.path.dirname(t) + "/nvidia/*/lib"))))')" || return 1
  local path="$bundle/lib:$torch_path" missing
  local extra="" lib round
  # A dry run takes ICU from the bundle as a machine without ICU 72 would (this one has it).
  if ((dry_run)); then
    for lib in "$bundle"/lib-extra/libicu*.xz; do
      [ -f "$lib" ] || continue
      mkdir -p "$work/lib-extra"
      "$DDE_GC_PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$lib" "$work/lib-extra/$(basename "$lib" .xz)" || return 1
      extra=1
    done
  fi
  # A library unpacked can need another one (ICU's uc needs its data): ldd again, a few rounds.
  for round in 1 2 3; do
    missing="$(env -i LD_LIBRARY_PATH="$path${extra:+:$work/lib-extra}" ldd "$bundle"/bin/* 2>&1 |
      awk '/not found/ { print $1 }' | sort -u)"
    local found=""
    for lib in $missing; do
      [ -f "$bundle/lib-extra/$lib.xz" ] && [ ! -f "$work/lib-extra/$lib" ] || continue
      echo "this machine lacks $lib: the bundle's joins LD_LIBRARY_PATH"
      mkdir -p "$work/lib-extra"
      "$DDE_GC_PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$bundle/lib-extra/$lib.xz" "$work/lib-extra/$lib" || return 1
      extra=1 found=1
    done
    [ -n "$found" ] || break
  done
  [ -n "$extra" ] && path="$path:$work/lib-extra"
  echo "LD_LIBRARY_PATH=$path"
  printf 'export LD_LIBRARY_PATH=%q\n' "$path" >>"$work/env.sh"
}

# Every binary and bundled library resolves every library with nothing but LD_LIBRARY_PATH (env -i).
# In a dry run also: each comes from the bundle, torch/NVIDIA, or glibc/GCC's runtime (or is one of
# lib-extra's, which every python3 image has): one from this machine's /usr/lib would be missing there.
ldd_check() {
  local bad=0 f listing name path
  local system_re='^(linux-vdso\.so|ld-linux-x86-64\.so|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libutil\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libnvidia-|libcrypto\.so|libssl\.so|libz\.so)'
  local torch_site
  torch_site="$("$DDE_GC_PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
  for f in "$bundle"/bin/* "$bundle"/lib/*.so*; do
    listing="$(env -i LD_LIBRARY_PATH="$LD_LIBRARY_PATH" ldd "$f" 2>&1)"
    if grep -q "not found" <<<"$listing"; then
      echo "$(basename "$f"):"; grep "not found" <<<"$listing"; bad=1; continue
    fi
    while read -r name _ path _; do
      [[ "$path" == /* ]] || continue
      [[ "$name" =~ $system_re ]] && continue
      case "$(readlink -f "$path")" in
        "$(readlink -f "$bundle")"/* | "$(readlink -f "$work")"/lib-extra/* | "$(readlink -f "$torch_site")"/*) continue ;;
      esac
      if ((dry_run)); then
        echo "$(basename "$f"): $name from $path, not from the bundle"; bad=1
      else
        echo "$(basename "$f"): $name from this machine ($path)"
      fi
    done < <(grep "=>" <<<"$listing")
  done
  echo "binaries need ${BUNDLE_GLIBC_NEEDED:-?}; this machine: $(ldd --version 2>&1 | head -n 1)"
  local n=("$bundle"/bin/* "$bundle"/lib/*)
  ((bad == 0)) && echo "all ${#n[@]} bundled binaries and libraries resolve every library"
  ((bad == 0))
}

# dde_tests reads configs/ under the source path compiled into it: point that path at this checkout.
link_source_dir() {
  local src="${BUNDLE_SOURCE_DIR:-}"
  [ -n "$src" ] || { echo "bundle.env has no BUNDLE_SOURCE_DIR"; return 1; }
  if [ -d "$src/configs" ]; then echo "$src/configs exists"; return 0; fi
  mkdir -p "$(dirname "$src")" && ln -sfn "$root" "$src" && echo "linked $src -> $root" && [ -d "$src/configs" ]
}

# run_gtest BINARY [FLAGS]: fails if a test fails and, on the GPU, if one is skipped. Under
# GTEST_TOTAL_SHARDS/GTEST_SHARD_INDEX it runs that shard (the tests' process groups use port 0).
run_gtest() {
  local bin="$1"; shift
  local raw scratch
  raw="$logs/$(basename "$bin")${GTEST_SHARD_INDEX:+.shard$GTEST_SHARD_INDEX}.out"
  scratch="$(mktemp -d "$work/gtest.XXXXXX")"
  (cd "$scratch" && "$bin" "$@") >"$raw" 2>&1
  local rc=$?
  grep -E "^\[  (FAILED|SKIPPED) +\]|^\[==========\]|^\[  PASSED  \]" "$raw"
  ((rc == 0)) || return "$rc"
  if ((!dry_run)) && grep -q "^\[  SKIPPED \]" "$raw"; then
    echo "tests were skipped on the GPU machine"; return 1
  fi
}

shard_gtest() (  # shard_gtest SHARDS INDEX BINARY [FLAGS] (a subshell: the variables stay in it)
  GTEST_TOTAL_SHARDS="$1" GTEST_SHARD_INDEX="$2"
  export GTEST_TOTAL_SHARDS GTEST_SHARD_INDEX
  shift 2
  run_gtest "$@"
)

phase_ctest() {
  local filter=() shards=4 i
  # Dry run: the tests nearest the plumbing (configs/ through the source link, the communicator).
  ((dry_run)) && filter=(--gtest_filter='ShippedConfigs.*:Communicator.*:DistDevice.*:CorrectionEma*') shards=1
  for ((i = 0; i < shards; i++)); do
    spawn check "ctest_dde_tests_$((i + 1))of$shards" shard_gtest "$shards" "$i" "$bundle/bin/dde_tests" "${filter[@]}"
  done
  if [ -x "$bundle/bin/dde_fake_device_tests" ]; then
    spawn check ctest_dde_fake_device_tests run_gtest "$bundle/bin/dde_fake_device_tests"
  fi
}

tiny_config() { if [ "$1" = sdxl ]; then echo configs/tiny_sdxl_dde.yaml; else echo configs/tiny_dde.yaml; fi; }

# keep_logs RUN NAME: the run's train.log and metrics.jsonl into the logs (not its checkpoints).
keep_logs() {
  mkdir -p "$logs/runs/$2"
  cp "$1"/train.log "$1"/metrics.jsonl "$logs/runs/$2/" 2>/dev/null
  return 0
}

# train NAME FAMILY [--set ...]: a 3-step tiny run of dde_train; checks 3 finite step losses.
train() {
  local name="$1" family="$2"; shift 2
  local run="$work/runs/$name"
  rm -rf "$run"
  "$bundle/bin/dde_train" --config "$(tiny_config "$family")" \
    --set model.manifest="$fixtures/export/$family/manifest.json" \
    --set data.index="$fixtures/shards/$family/index.json" --set run.output_dir="$run" \
    --set data.eval_index="$fixtures/shards/${family}_eval/index.json" --set eval.every=3 \
    --set run.device="$device" --set train.max_steps=3 --set checkpoint.every=3 "$@"
  local rc=$?
  keep_logs "$run" "$name"
  ((rc == 0)) || return "$rc"
  "$DDE_GC_PY" - "$run/metrics.jsonl" <<'EOF'
import json, math, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"step"' in l.replace(" ", "")]
assert len(steps) == 3, f"{len(steps)} step records"
assert all(math.isfinite(s["loss"]) and s["skipped_steps"] == 0 for s in steps), steps
print("losses", [round(s["loss"], 5) for s in steps], "pairs/s", [round(s["pairs_per_s"], 1) for s in steps])
EOF
}

log_has() {  # log_has NAME PATTERN: run NAME's train.log or its check's log has PATTERN
  grep -q -- "$2" "$logs/runs/$1/train.log" "$logs/$1.log" 2>/dev/null ||
    { echo "'$2' in neither runs/$1/train.log nor $1.log"; return 1; }
}

e2e_one() {  # e2e_one FAMILY METHOD [--set ...]: the run, then that it ran on $device
  local family="$1" method="$2"; shift 2
  local name="e2e_${family}_${method}" want="device cpu"
  ((dry_run)) || want="device cuda:0"
  check "$name" train "$name" "$family" --set method.name="${method%_bf16}" "$@" &&
    check "${name}_on_$device" log_has "$name" "$want"
}

phase_e2e() {
  for family in sd15 sdxl; do
    for method in sft uniform discounted dde_single dde_step dde; do
      spawn e2e_one "$family" "$method"
    done
    spawn e2e_one "$family" dde_bf16 --set train.precision=bf16
  done
}

# One visible GPU and LOCAL_RANK 3 (a launcher that isolates each task's GPU): must use cuda:0.
train_one_visible_gpu() {
  CUDA_VISIBLE_DEVICES=0 LOCAL_RANK=3 RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 train "$@"
}

phase_nccl() {
  local backend=nccl
  ((dry_run)) && backend=gloo
  check nccl_world_of_one train nccl_world_of_one sd15 --set dist.force_process_group=true \
    --set logging.per_sample=true &&
    check nccl_world_of_one_backend log_has nccl_world_of_one "backend $backend"
  if ((!dry_run)); then
    check nccl_one_visible_gpu train_one_visible_gpu nccl_one_visible_gpu sd15 --set dist.force_process_group=true &&
      check nccl_one_visible_gpu_device log_has nccl_one_visible_gpu "device cuda:0"
  fi
}

# train_from_cache NAME FAMILY [--set ...]: encodes the tiny shards into a latent cache, then
# `train`s from it (the loader's pinned moments and embeddings in place of the uint8 images).
train_from_cache() {
  local name="$1" family="$2"; shift 2
  local cache="$work/runs/${name}_latents"
  rm -rf "$cache"
  "$bundle/bin/dde_encode_cache" --config "$(tiny_config "$family")" \
    --set model.manifest="$fixtures/export/$family/manifest.json" \
    --set data.index="$fixtures/shards/$family/index.json" --set run.device="$device" \
    --out "$cache" || return 1
  train "$name" "$family" --set data.cache="$cache/index.json" "$@"
}

phase_sync() {
  for family in sd15 sdxl; do
    spawn check "sync_debug_${family}" train "sync_${family}" "$family" --set run.cuda_sync_debug=error \
      --set logging.per_sample=true
    spawn check "sync_debug_${family}_bf16" train "sync_${family}_bf16" "$family" \
      --set run.cuda_sync_debug=error --set train.precision=bf16
    spawn check "sync_debug_${family}_cache" train_from_cache "sync_${family}_cache" "$family" \
      --set run.cuda_sync_debug=error --set train.precision=bf16
  done
}

# The full-size pipeline of `full` and `bench`: made and exported in the background from setup on
# (bench/vs_diffusion_dpo.py's prepare, on the CPU); wait_prepared waits for it.
bench_work() {  # a dry run keeps its tiny pipeline between runs
  if ((dry_run)); then echo "$root/runs/gpu_check_bench"; else echo "$work/bench_vs_dpo"; fi
}
start_prepare() {
  local dir
  dir="$(bench_work)"
  mkdir -p "$dir"
  rm -f "$dir/prepare.rc"
  (
    OMP_NUM_THREADS=$((dry_run ? 1 : 12)) timeout -k 10 "$1" "$DDE_GC_PY" - "$dir" "$size" "$rows" \
      >"$logs/prepare_$size.log" 2>&1 <<'EOF' &
import pathlib, sys, time
sys.path[:0] = ["bench", "scripts"]
import vs_diffusion_dpo as b
start = time.time()
print(b.prepare(pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
print(f"prepared in {time.time() - start:.0f} s")
EOF
    echo $! >"$dir/prepare.pid"
    wait $!
    echo $? >"$dir/prepare.rc"
  ) &
}
wait_prepared() {
  local dir start=$SECONDS
  dir="$(bench_work)"
  [ -f "$dir/prepare.pid" ] || { echo "the pipeline was not being prepared (setup failed?)"; return 1; }
  while [ ! -f "$dir/prepare.rc" ]; do sleep 1; done
  echo "waited $((SECONDS - start)) s for the $size pipeline; prepare exited $(cat "$dir/prepare.rc"):"
  tail -n 5 "$logs/prepare_$size.log"
  [ "$(cat "$dir/prepare.rc")" = 0 ]
}

# train_full_size RUN [--set ...]: dde_train on the full-size SD1.5 pipeline of `full` (bf16,
# checkpointing, no warm-up) into RUN, with the caller's settings.
train_full_size() {
  local base run="$1"
  shift
  base="$(bench_work)/$size"
  "$bundle/bin/dde_train" --config configs/sd15_dde.yaml --set model.manifest="$base/export/manifest.json" \
    --set data.index="$base/shards/index.json" --set run.output_dir="$run" --set run.device="$device" \
    --set train.precision=bf16 --set train.gradient_checkpointing=true --set optim.warmup_steps=0 \
    --set logging.progress=false "$@"
}

full_step() {
  wait_prepared || return 1
  local run="$work/runs/full_bf16"
  rm -rf "$run"
  train_full_size "$run" --set train.global_batch=4 --set train.micro_batch=4 --set train.max_steps=1 \
    --set checkpoint.every=1 --set data.shuffle_buffer=64 --set data.workers=4
  local rc=$?
  keep_logs "$run" full_bf16
  ((dry_run)) || nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  cat "$run/metrics.jsonl"
  rm -rf "$run"  # a full-size checkpoint is ~10 GB
  ((rc == 0)) || return "$rc"
  grep -q "gradient_checkpointing: true" "$logs/runs/full_bf16/train.log" || { echo "not checkpointed?"; return 1; }
  grep -q '"kind": *"step"' "$logs/runs/full_bf16/metrics.jsonl"
}

phase_full() {
  check full_sd15_bf16_checkpointing full_step
}

# One GPU (issue 27): the full fine-tune against LoRA rank 8, mapo (no reference UNet) and mapo
# with LoRA, on the full-size SD1.5 pipeline of `full`, side by side: bf16, checkpointing,
# micro-batch 1, 3 steps each. Each row prints its last step record (mem_peak_mb: the CUDA
# allocator's peak; pairs_per_s) and the parameters trained; the table of bench/README.md
# ("One GPU") is the CPU's.
one_gpu_rows() {
  wait_prepared || return 1
  local name run rc=0 extra
  for name in full_dde lora8_dde mapo lora8_mapo; do
    case "$name" in
      full_dde) extra=(--set method.name=dde) ;;
      lora8_dde) extra=(--set method.name=dde --set "model.lora={rank: 8}") ;;
      mapo) extra=(--set method.name=mapo) ;;
      lora8_mapo) extra=(--set method.name=mapo --set "model.lora={rank: 8}") ;;
    esac
    run="$work/runs/one_gpu_$name"
    rm -rf "$run"
    train_full_size "$run" --set train.global_batch=1 --set train.micro_batch=1 --set train.max_steps=3 \
      --set checkpoint.every=1000 --set data.eval_index= --set data.workers=2 "${extra[@]}" || rc=1
    keep_logs "$run" "one_gpu_$name"
    echo "one_gpu $name: $(grep -o '[0-9]* parameters trained' "$run/train.log" | head -1);" \
      "last step: $(grep '"kind": *"step"' "$run/metrics.jsonl" | tail -1)"
    rm -rf "$run"  # a full fine-tune's checkpoint is ~10 GB
  done
  return "$rc"
}

phase_one_gpu() {
  check one_gpu_full_lora_mapo one_gpu_rows
}

run_bench() {
  wait_prepared || return 1
  if ((dry_run)); then
    "$DDE_GC_PY" bench/vs_diffusion_dpo.py --device cpu --size tiny --rows "$rows" --rounds 1 --steps 3 \
      --warmup 1 --global-batch 2 --threads 1 --dde-cache --build "$bundle/bin" --work "$(bench_work)" \
      --out "$out/vs_diffusion_dpo-dry-run.json"
  else
    "$DDE_GC_PY" bench/vs_diffusion_dpo.py --device cuda --size full --rows "$rows" --rounds 1 --steps 5 \
      --warmup 2 --global-batch 8 --dde-micro-batch 8 --workers 8 --dde-cache --cache-batch 16 \
      --timeout "${budget[bench]}" --build "$bundle/bin" --work "$(bench_work)" \
      --out "$out/vs_diffusion_dpo-cuda.json"
  fi
  local rc=$?
  cp "$(bench_work)"/runs/*.log "$logs/" 2>/dev/null
  return "$rc"
}

phase_bench() {
  check bench run_bench
}

# ---------------------------------------------------------------------------- worker mode
if [ -n "$worker" ]; then
  logs="$DDE_GC_LOGS" work="$DDE_GC_WORK" out="$DDE_GC_OUT"
  checks="$logs/checks_$worker.txt"
  : >"$checks"
  DDE_GC_PY="${DDE_GC_PY:-python3}" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
  # The phases that run beside the background export leave it CPU cores (tiny runs need few).
  case "$worker" in ctest | e2e | nccl | sync) ((dry_run)) || export OMP_NUM_THREADS=4 ;; esac
  "phase_$worker"
  wait
  ! grep -q "^  FAIL" "$checks"
  exit $?
fi

# ---------------------------------------------------------------------------- main
out="${OUT:-$root/runs/gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
logs="$(mktemp -d /tmp/gpu_check_logs.XXXXXX)"
work="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"
export DDE_GC_LOGS="$logs" DDE_GC_WORK="$work" DDE_GC_OUT="$out" PYTHONUNBUFFERED=1 DDE_FIXTURES_DIR="$fixtures"
summary="$out/summary.txt"
: >"$summary"
failures=0
t0=$SECONDS
deadline=$((t0 + total))

note() { echo "$*" | tee -a "$summary"; }
finish() {
  local f
  f="$(bench_work)/prepare.pid"
  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
  wait 2>/dev/null
  cp "$bundle/bundle.env" "$bundle/MANIFEST.txt" "$logs/" 2>/dev/null
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
  note "gpu_check: $failures failed phase(s) in $((SECONDS - t0)) s; logs in $out/logs.tar.gz"
  rm -rf "$logs" "$work"
}
trap finish EXIT

# run_phase NAME: the phase in a worker under `timeout`, then its line and its checks' lines.
run_phase() {
  local name="$1"
  local limit=$((deadline - SECONDS - 5))
  ((limit > budget[$name])) && limit=${budget[$name]}
  if ((limit < 5)); then
    note "TIMEOUT $name (0 s): nothing left of the total $total s"
    failures=$((failures + 1))
    return
  fi
  local start=$SECONDS status
  echo "gpu_check: $name (budget $limit s) ..."
  local flags=()
  ((dry_run)) && flags=(--dry-run)
  timeout -k 10 "$limit" bash "$self" --worker "$name" "${flags[@]}" >"$logs/phase_$name.log" 2>&1
  local rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  note "$status $name ($((SECONDS - start)) s, budget $limit s)"
  [ -f "$logs/checks_$name.txt" ] && tee -a "$summary" <"$logs/checks_$name.txt"
  [ "$status" = TIMEOUT ] && tail -n 5 "$logs/phase_$name.log" | sed 's/^/    | /' | tee -a "$summary"
  [ "$status" = PASS ] || failures=$((failures + 1))
}

((${#phases[@]})) || phases=("${all_phases[@]}")
[[ " ${phases[*]} " == *" setup "* ]] || phases=(setup "${phases[@]}")  # the others need it
note "gpu_check $(date -u +%FT%TZ) on $(hostname), checkout $(git rev-parse --short HEAD 2>/dev/null)," \
  "bundle of ${BUNDLE_GIT:-?} (${BUNDLE_DATE:-?}, torch ${BUNDLE_TORCH:-?}), dry run $dry_run, phases: ${phases[*]}"
[ -n "${DDE_GC_PRELUDE:-}" ] && note "$DDE_GC_PRELUDE"
command -v nvidia-smi >/dev/null 2>&1 &&
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
for phase in "${all_phases[@]}"; do
  [[ " ${phases[*]} " == *" $phase "* ]] || continue
  run_phase "$phase"
  if [ "$phase" = setup ]; then
    # shellcheck source=/dev/null
    . "$work/env.sh" 2>/dev/null
    export DDE_GC_PY LD_LIBRARY_PATH PYTHONPATH
    if [ -n "${DDE_GC_PY:-}" ] && [[ " ${phases[*]} " == *" full "* || " ${phases[*]} " == *" one_gpu "* || " ${phases[*]} " == *" bench "* ]]; then
      start_prepare $((deadline - SECONDS))
    fi
  fi
done
((failures == 0))
