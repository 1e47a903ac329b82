#!/usr/bin/env bash
# The main job on the tiny embedded default: set-up, build, fixtures, export, train
# configs/tiny_dde.yaml on the CPU, figures, and the held-out implicit accuracy before and after.
# Leaves runs/tiny_dde/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
echo "quickstart: 1/4 set-up (Debian packages, .venv with the pinned wheels)"
bash scripts/setup.sh
# The C++ build and the fixtures (Python, mostly one core) run side by side.
echo "quickstart: 2/4 build dde_train only (the tests and probes are scripts/test.sh's), and"
echo "quickstart: 3/4 the tiny SD1.5 fixtures (pipeline, Pick-a-Pic-like pairs, exports) beside it"
(set -o pipefail; bash scripts/build.sh dde_train 2>&1 | sed -u 's/^/[build] /') &
build_pid=$!
DDE_FIXTURE_FAMILIES=sd15 bash scripts/prepare_tiny.sh 2>&1 | sed -u 's/^/[fixtures] /'
if ! wait "$build_pid"; then
  echo "quickstart: the build failed (above)" >&2
  exit 1
fi
echo "quickstart: 4/4 train configs/tiny_dde.yaml"
rm -rf runs/tiny_dde
# One intra-op thread: the tiny models are overhead-bound, and on a busy 2-core machine two
# OpenMP threads made the run ~10x slower (6 s instead of 0.3 s per step, measured).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" build/dde_train --config configs/tiny_dde.yaml "$@"
PYTHONPATH=scripts .venv/bin/python -m dde_tools.plot_run runs/tiny_dde
PYTHONPATH=scripts .venv/bin/python -c 'from pathlib import Path; from dde_tools import plot_run as p
print("quickstart:", p.eval_summary(p.read_records(Path("runs/tiny_dde"))["eval"]))'
echo "quickstart: run directory runs/tiny_dde (metrics.jsonl, checkpoints/, figures/eval.png, ...)"
