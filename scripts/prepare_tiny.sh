#!/usr/bin/env bash
# Makes the tiny fixtures the quick start and the tests train on, idempotently:
#   fixtures/source/{sd15,sdxl}          tiny diffusers pipelines (random weights, seed 0)
#   fixtures/source/pickapic/*.parquet   synthetic Pick-a-Pic v2 rows (a learnable preference)
#   fixtures/source/pickapic_eval/*.parquet   held-out rows of the same kind
#   fixtures/export/{sd15,sdxl}          TorchScript components + manifest.json
#   fixtures/shards/{sd15,sdxl}          tar shards + index.json, token ids per text encoder
#   fixtures/shards/{sd15,sdxl}_eval     the held-out shards (config data.eval_index)
#   fixtures/shards/captions             the training rows as captions only (no token ids)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=".venv/bin/python"
export PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}"
out="${DDE_FIXTURES_DIR:-$root/fixtures}"
# The families to export (the quick start needs sd15 only): DDE_FIXTURE_FAMILIES="sd15 sdxl".
read -r -a families <<< "${DDE_FIXTURE_FAMILIES:-sd15 sdxl}"
for family in "${families[@]}"; do
  case "$family" in sd15|sdxl) ;; *) echo "prepare_tiny: unknown family '$family' in DDE_FIXTURE_FAMILIES (sd15, sdxl)" >&2; exit 2;; esac
done

"$py" -m dde_tools.fixtures --out "$out/source"
for family in "${families[@]}"; do
  # Re-export whenever the source fixtures were rebuilt (their stamp is newer).
  # ... or the exporter changed since (an export is the exporter's output as much as the source's).
  if [ ! -f "$out/export/$family/manifest.json" ] || \
     [ "$out/source/$family/dde_fixture.json" -nt "$out/export/$family/manifest.json" ] || \
     [ scripts/dde_tools/export_models.py -nt "$out/export/$family/manifest.json" ] || \
     [ scripts/dde_tools/unet_blocks.py -nt "$out/export/$family/manifest.json" ] || \
     ! grep -q '"push_output"' "$out/export/$family/manifest.json"; then
    rm -rf "$out/export/$family" "$out/shards/$family" "$out/shards/${family}_eval"
    "$py" -m dde_tools.export_models --pipeline "$out/source/$family" --out "$out/export/$family"
  fi
  # ... and the shards whenever their source was rebuilt or the index predates version 2.
  tokenizers=(--tokenizer "$out/export/$family/tokenizer")
  [ "$family" = sdxl ] && tokenizers+=(--tokenizer "$out/export/$family/tokenizer_2")
  for split in pickapic:"$family" pickapic_eval:"${family}_eval"; do
    source="$out/source/${split%%:*}" shards="$out/shards/${split#*:}"
    if [ ! -f "$shards/index.json" ] || [ "$source/dde_fixture.json" -nt "$shards/index.json" ] || \
       ! grep -q '"version": 2' "$shards/index.json"; then
      "$py" -m dde_tools.export_pickapic --parquet "$source"/*.parquet \
        --out "$shards" --pairs-per-shard 16 "${tokenizers[@]}"
    fi
  done
done
# The training rows once more without --tokenizer: captions only, one export for every family
# (dde_train tokenizes them; tests compare them with the shards above).
source="$out/source/pickapic" shards="$out/shards/captions"
if [ ! -f "$shards/index.json" ] || [ "$source/dde_fixture.json" -nt "$shards/index.json" ]; then
  "$py" -m dde_tools.export_pickapic --parquet "$source"/*.parquet --out "$shards" --pairs-per-shard 16
fi
echo "prepare_tiny: fixtures ready in $out"
