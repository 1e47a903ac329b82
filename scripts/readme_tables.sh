#!/usr/bin/env bash
# Regenerates the README's quick-start accuracy table from real runs (issue 17: typed numbers drift).
#   bash scripts/readme_tables.sh [--force]
# Trains configs/tiny_dde.yaml at run.seed 0, 1, 2 into runs/readme_seedS (a seed whose run already
# holds the final evaluation is kept unless --force), rewrites the README block between the
# readme_tables:quickstart markers, and copies seed 0's figures to docs/figures/.
# Needs build/dde_train (bash scripts/build.sh dde_train) and a .venv (bash scripts/setup.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=".venv/bin/python"
export PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}"
config=configs/tiny_dde.yaml
seeds=(0 1 2)
figures=(eval.png training.png credit.png correction.png)  # the images README.md shows

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    *) echo "readme_tables: unknown argument '$arg': expected --force or nothing" >&2; exit 2 ;;
  esac
done
for need in build/dde_train "$py"; do
  if [ ! -x "$need" ]; then
    echo "readme_tables: $need not found: run bash scripts/setup.sh and bash scripts/build.sh dde_train" >&2
    exit 2
  fi
done

# The step of the run's final evaluation (train.max_steps), and whether RUN_DIR holds it.
final_step="$("$py" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["train"]["max_steps"])' "$config")"
has_final_eval() {
  [ -f "$1/metrics.jsonl" ] && "$py" - "$1" "$final_step" <<'EOF' 2>/dev/null
import sys
from pathlib import Path
from dde_tools.plot_run import read_records
steps = {r["step"] for r in read_records(Path(sys.argv[1]))["eval"]}
sys.exit(0 if int(sys.argv[2]) in steps else 1)
EOF
}

start=$SECONDS
mkdir -p runs
bash scripts/prepare_tiny.sh
run_args=()
for seed in "${seeds[@]}"; do
  run="runs/readme_seed$seed"
  run_args+=(--run "$seed=$run")
  if [ "$force" = 0 ] && has_final_eval "$run"; then
    echo "readme_tables: $run holds the step-$final_step evaluation: kept (--force reruns it)"
    continue
  fi
  echo "readme_tables: training $config with run.seed=$seed into $run"
  rm -rf "$run"
  seed_start=$SECONDS
  # One intra-op thread: the tiny models are overhead-bound (see scripts/quickstart.sh).
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" build/dde_train --config "$config" \
    --set run.seed="$seed" --set run.output_dir="$run" > "$run.log" 2>&1 || {
      echo "readme_tables: dde_train failed for run.seed=$seed; its output: $run.log" >&2; exit 1; }
  echo "readme_tables: run.seed=$seed trained in $((SECONDS - seed_start)) s"
done

"$py" -m dde_tools.readme_tables "${run_args[@]}" --readme README.md
"$py" -m dde_tools.plot_run "runs/readme_seed${seeds[0]}" > /dev/null
mkdir -p docs/figures
for name in "${figures[@]}"; do
  cp "runs/readme_seed${seeds[0]}/figures/$name" "docs/figures/$name"
done
echo "readme_tables: README.md and docs/figures/ regenerated in $((SECONDS - start)) s"
