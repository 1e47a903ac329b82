#!/usr/bin/env bash
# The miniature world experiment in one command (docs/miniature.md):
#   bash experiments/miniature/run.sh [--smoke] [--out DIR] [--bin build/dde_train] [report]
# Leaves runs/miniature/ (or runs/miniature_smoke/): results.md, results.json, figures/.
# Not part of scripts/test.sh; its --smoke version is tests/e2e/test_miniature_smoke.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# One intra-op thread per process: the models are tiny and the machine has 2 cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHONPATH="$root/scripts:$root/experiments${PYTHONPATH:+:$PYTHONPATH}" \
  exec .venv/bin/python -m miniature.run "$@"
