#!/usr/bin/env bash
# Makes the tiny fixtures the quick start and the tests train on, idempotently:
#   fixtures/source/{sd15,sdxl}          tiny diffusers pipelines (random weights, seed 0)
#   fixtures/source/pickapic/*.parquet   synthetic Pick-a-Pic v2 rows
#   fixtures/export/{sd15,sdxl}          TorchScript components + manifest.json
#   fixtures/shards/{sd15,sdxl}          tar shards + index.json, token ids per text encoder
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=".venv/bin/python"
export PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}"
out="${DDE_FIXTURES_DIR:-$root/fixtures}"

"$py" -m dde_tools.fixtures --out "$out/source"
for family in sd15 sdxl; do
  # Re-export whenever the source fixtures were rebuilt (their stamp is newer).
  if [ ! -f "$out/export/$family/manifest.json" ] || \
     [ "$out/source/$family/dde_fixture.json" -nt "$out/export/$family/manifest.json" ] || \
     ! grep -q '"push_output"' "$out/export/$family/manifest.json"; then
    rm -rf "$out/export/$family" "$out/shards/$family"
    "$py" -m dde_tools.export_models --pipeline "$out/source/$family" --out "$out/export/$family"
  fi
  # ... and whenever the index predates index.json version 2 (shard sizes and hashes).
  if [ ! -f "$out/shards/$family/index.json" ] || \
     [ "$out/source/pickapic/dde_fixture.json" -nt "$out/shards/$family/index.json" ] || \
     ! grep -q '"version": 2' "$out/shards/$family/index.json"; then
    tokenizers=(--tokenizer "$out/export/$family/tokenizer")
    [ "$family" = sdxl ] && tokenizers+=(--tokenizer "$out/export/$family/tokenizer_2")
    "$py" -m dde_tools.export_pickapic --parquet "$out"/source/pickapic/*.parquet \
      --out "$out/shards/$family" --pairs-per-shard 16 "${tokenizers[@]}"
  fi
done
echo "prepare_tiny: fixtures ready in $out"
