#!/usr/bin/env bash
# Runs the numeric end-to-end tests under each CPU kernel set of LibTorch that this processor can
# execute other than its own (which the main pytest pass ran): ATEN_CPU_CAPABILITY=default (scalar),
# avx2, avx512. Each set sums in its own order, so a numeric bound measured on one processor fails
# here instead of on a user's. A set above the processor's own is not run (LibTorch does not check
# the forced value against the hardware: it would die of an illegal instruction).
#   bash scripts/kernel_sets.sh [pytest args ...]     # e.g. -k checkpointing
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tests=(
  tests/e2e/test_precision_checkpointing.py  # checkpointing on/off, bf16, frozen bf16
  tests/e2e/test_forward_parity.py           # the trainer's errors against diffusers
  tests/e2e/test_method_options.py           # per-pair z and credit against the method note
  tests/e2e/test_validation_images.py        # step-0 grids against diffusers' sampling
  tests/e2e/test_train_e2e.py                # every method against the note, bit-exact resume
  tests/e2e/test_heldout_eval.py             # the held-out figures against diffusers
)
# A separate pytest run: tests/python and tests/e2e each have their own conftest module.
tool_tests=(tests/python/test_unet_blocks.py)  # exported blocks against UNet2DConditionModel
native="$(env -u ATEN_CPU_CAPABILITY .venv/bin/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
case "$native" in
  AVX512) sets=(default avx2) ;;
  AVX2) sets=(default) ;;
  DEFAULT) sets=() ;;
  *) echo "kernel sets: this processor's own is $native (not x86-64): nothing else to run"; exit 0 ;;
esac
echo "kernel sets: this processor runs $native; also running: ${sets[*]:-none}"
for set in "${sets[@]}"; do
  echo "-- ATEN_CPU_CAPABILITY=$set"
  ATEN_CPU_CAPABILITY="$set" .venv/bin/python -m pytest -q "${tests[@]}" "$@"
  ATEN_CPU_CAPABILITY="$set" .venv/bin/python -m pytest -q "${tool_tests[@]}" "$@"
done
