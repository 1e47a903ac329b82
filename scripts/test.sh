#!/usr/bin/env bash
# Runs every test: set-up (idempotent), build, tiny fixtures, C++ unit tests (ctest),
# Python tool tests and end-to-end runs of the real binary (pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
# Each phase's wall time, printed at the end (CI's budget: keep the whole under 40 minutes).
phases=""
phase_start=$start
phase() {
  local now
  now=$(date +%s)
  phases+="$(printf '%6d s  %s' $((now - phase_start)) "$1")"$'\n'
  phase_start=$now
}
bash scripts/setup.sh
phase "setup"
bash scripts/build.sh
phase "build"
bash scripts/prepare_tiny.sh
phase "fixtures"
export DDE_BUILD_DIR="${DDE_BUILD_DIR:-$root/build}"
export DDE_FIXTURES_DIR="${DDE_FIXTURES_DIR:-$root/fixtures}"
echo "== C++ unit tests (ctest)"
ctest --test-dir "$DDE_BUILD_DIR" --output-on-failure -j2
phase "C++ unit tests"
echo "== device correctness without a GPU: the strict fake accelerator (scripts/fake_device_check.sh)"
DDE_FAKE_CHECK_SKIP_SETUP=1 bash scripts/fake_device_check.sh
phase "fake accelerator"
echo "== fuzzing: file parsers and image decoder (libFuzzer, ~1.5 min from scratch; regressions replayed)"
bash scripts/fuzz.sh
phase "fuzzing"
echo "== Python and end-to-end tests (pytest)"
.venv/bin/python -m pytest -q --durations=15 tests/python tests/e2e
phase "pytest (python, e2e)"
echo "== numeric end-to-end tests again under this processor's other CPU kernel sets (ATEN_CPU_CAPABILITY)"
# LibTorch picks its CPU kernels by the processor's features and each set sums in its own order: a
# bound measured on one processor fails on another. Running the numeric comparisons under every set
# this processor can execute makes such a bound fail here too (scripts/kernel_sets.sh).
bash scripts/kernel_sets.sh
phase "other kernel sets"
echo "== Slurm: a single-node cluster on this machine, sbatch, preemption, a killed rank"
.venv/bin/python -m pytest -q tests/slurm
phase "slurm"
echo "== style: clang-format and clang-tidy"
bash scripts/lint.sh
phase "lint"
printf '%s' "$phases"
echo "== all tests passed in $(( $(date +%s) - start )) s"
