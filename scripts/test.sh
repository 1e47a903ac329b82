#!/usr/bin/env bash
# Runs every test: set-up (idempotent), build, tiny fixtures, C++ unit tests (ctest),
# Python tool tests and end-to-end runs of the real binary (pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
bash scripts/setup.sh
bash scripts/build.sh
bash scripts/prepare_tiny.sh
export DDE_BUILD_DIR="${DDE_BUILD_DIR:-$root/build}"
export DDE_FIXTURES_DIR="${DDE_FIXTURES_DIR:-$root/fixtures}"
echo "== C++ unit tests (ctest)"
ctest --test-dir "$DDE_BUILD_DIR" --output-on-failure -j2
echo "== device correctness without a GPU: the strict fake accelerator (scripts/fake_device_check.sh)"
DDE_FAKE_CHECK_SKIP_SETUP=1 bash scripts/fake_device_check.sh
echo "== fuzzing: file parsers and image decoder (libFuzzer, ~1.5 min; regressions replayed)"
bash scripts/fuzz.sh
echo "== Python and end-to-end tests (pytest)"
.venv/bin/python -m pytest -q tests/python tests/e2e
echo "== numeric end-to-end tests again under this processor's other CPU kernel sets (ATEN_CPU_CAPABILITY)"
# LibTorch picks its CPU kernels by the processor's features and each set sums in its own order: a
# bound measured on one processor fails on another. Running the numeric comparisons under every set
# this processor can execute makes such a bound fail here too (scripts/kernel_sets.sh).
bash scripts/kernel_sets.sh
echo "== Slurm: a single-node cluster on this machine, sbatch, preemption, a killed rank"
.venv/bin/python -m pytest -q tests/slurm
echo "== style: clang-format and clang-tidy"
bash scripts/lint.sh
echo "== all tests passed in $(( $(date +%s) - start )) s"
