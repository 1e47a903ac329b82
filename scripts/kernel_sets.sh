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
# The tests whose bounds depend on summation order: each comparison against a reference (diffusers,
# float64, the method note) or between two code paths. Tests of messages, refusals, multi-process
# splits and exact resumes (same kernels on both sides) are the main pass's alone; every method is
# checked against the note on sd15 here, and dde on sdxl too (README, "Tests": the CI time).
e2e=tests/e2e
tests=(
  $e2e/test_precision_checkpointing.py                            # checkpointing on/off, bf16, frozen bf16
  $e2e/test_forward_parity.py                                     # the trainer's errors against diffusers
  "$e2e/test_method_options.py::test_calibrated_temperature_with_a_window"        # z and credit vs the note
  "$e2e/test_method_options.py::test_debiased_correction_over_twenty_steps_and_resume"
  "$e2e/test_method_options.py::test_uniform_ct_draws_t_by_c_t_and_scores_as_uniform"
  "$e2e/test_validation_images.py::test_step0_grid_is_diffusers_sampling_of_the_base"  # grids vs diffusers
  "$e2e/test_train_e2e.py::test_every_method_trains_and_logs_what_the_method_note_says"  # -k below
  "$e2e/test_train_e2e.py::test_policy_equal_to_reference_gives_log2_and_zero_accuracy"
  "$e2e/test_heldout_eval.py::test_step_0_has_delta_zero_and_loss_log_2"          # held-out figures
  "$e2e/test_heldout_eval.py::test_eval_equals_a_diffusers_recomputation_from_the_checkpoint"
)
select="not sdxl or dde-sdxl or test_precision or test_forward_parity or test_step0_grid"
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
  ATEN_CPU_CAPABILITY="$set" .venv/bin/python -m pytest -q "${tests[@]}" -k "$select" "$@"
  ATEN_CPU_CAPABILITY="$set" .venv/bin/python -m pytest -q "${tool_tests[@]}" "$@"
done
