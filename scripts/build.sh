#!/usr/bin/env bash
# Configures and builds dde (CUDA-enabled LibTorch from .venv) into build/: every target
# (dde_train, dde_encode_cache, dde_tokenize, the test binaries and probes), or those named
# (bash scripts/build.sh dde_train; bash scripts/build.sh dde_tokenize builds only the torch-free
# tokenizer). Uses ccache when it is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/cuda/bin:$PATH"
build_dir="${DDE_BUILD_DIR:-$root/build}"
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
# Optional arguments: the targets to build (the quick start needs only dde_train); none = all.
targets=()
for t in "$@"; do targets+=(--target "$t"); done
if command -v ccache >/dev/null 2>&1 && ! grep -q CMAKE_CXX_COMPILER_LAUNCHER "$build_dir/CMakeCache.txt"; then
  cmake -S "$root" -B "$build_dir" -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >/dev/null
fi
cmake --build "$build_dir" -j"$(nproc)" "${targets[@]}"
