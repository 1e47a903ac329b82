#!/usr/bin/env bash
# The device-correctness check without a GPU: dde on the strict fake accelerator
# (tests/fake_device/fake_device.cpp, PyTorch's PrivateUse1 device over host memory, which fails
# like CUDA when a host tensor meets a device op). Runs its own C++ tests (the device semantics,
# the communicator on it), then dde_train and dde_encode_cache LD_PRELOADed with it: every method
# and both families with the held-out evaluation, a bad pair mid-run, resume, the latent cache,
# two Gloo ranks and ZeRO-1 (tests/fake_device/test_fake_device_e2e.py).
# Exits non-zero on any device error. Set-up, build and fixtures are idempotent (scripts/test.sh
# has run them already when it calls this).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export DDE_BUILD_DIR="${DDE_BUILD_DIR:-$root/build}"
export DDE_FIXTURES_DIR="${DDE_FIXTURES_DIR:-$root/fixtures}"
if [ "${DDE_FAKE_CHECK_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh >/dev/null
  bash scripts/build.sh
  bash scripts/prepare_tiny.sh >/dev/null
fi
for f in "$DDE_BUILD_DIR/tests/cpp/libdde_fake_device.so" "$DDE_BUILD_DIR/tests/cpp/dde_fake_device_tests"; do
  [ -f "$f" ] || { echo "fake_device_check: $f is missing: build with scripts/build.sh" >&2; exit 1; }
done
echo "== fake device: its own tests and the communicator on it"
"$DDE_BUILD_DIR/tests/cpp/dde_fake_device_tests" --gtest_brief=1
echo "== fake device: dde_train and dde_encode_cache (every method, both families)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/fake_device
