#!/usr/bin/env bash
# libFuzzer runs of the parsers of every file dde_train reads (tests/fuzz/fuzz_*.cpp): the data
# side's (shards, index, images, the latent cache) and the checkpoint's (safetensors headers,
# trainer_state.json, rank-NNNNN.json), built with clang (-fsanitize=fuzzer,address,undefined)
# from the torch-free sources into build/fuzz/.
#   bash scripts/fuzz.sh            # replay tests/fuzz/regressions, then ~12 s per target
#   bash scripts/fuzz.sh 600        # the long run of bench/README.md (seconds per target)
#   bash scripts/fuzz.sh 0          # replay only
# Starts from tests/fuzz/seeds/<target>; new corpus entries stay in build/fuzz/corpus. A crash
# leaves crash-* in build/fuzz/; copy it to tests/fuzz/regressions/<target>/ with the fix.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-12}"
out="${DDE_BUILD_DIR:-$root/build}/fuzz"
mkdir -p "$out"
fmt_include="$(.venv/bin/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
flags=(-std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined
       -Iinclude -Itests/fuzz -isystem /usr/include/stb -DFMT_HEADER_ONLY=1)
common=(src/util/error.cpp src/data/data_error.cpp src/util/file_read.cpp)
declare -A sources=(
  [fuzz_tar_reader]="src/data/tar_reader.cpp"
  [fuzz_pair_record]="src/data/tar_reader.cpp src/data/pair_record.cpp"
  [fuzz_shard_index]="src/data/shard_index.cpp"
  [fuzz_image_decode]="src/data/image_decode.cpp src/data/image.cpp tests/fuzz/stb_image_impl.cpp"
  [fuzz_safetensors_header]="src/checkpoint/safetensors_header.cpp"
  [fuzz_latent_cache]="src/data/latent_cache_format.cpp src/checkpoint/safetensors_header.cpp"
  [fuzz_checkpoint_json]="src/checkpoint/checkpoint_json.cpp"
)
declare -A libs=([fuzz_image_decode]="-lturbojpeg")
# libFuzzer dictionaries: the JSON readers' keys and edge numbers (1e400, 2^63, ...).
declare -A dicts=([fuzz_safetensors_header]=tests/fuzz/json.dict [fuzz_latent_cache]=tests/fuzz/json.dict
                  [fuzz_checkpoint_json]=tests/fuzz/json.dict)
targets=(fuzz_tar_reader fuzz_pair_record fuzz_shard_index fuzz_image_decode
         fuzz_safetensors_header fuzz_latent_cache fuzz_checkpoint_json)
# Every distinct source is compiled once (several targets share the parsers and src/util), in
# parallel, then each target is linked: a fresh clone's build takes a third of the time it took
# target by target.
objdir="$out/obj"
mkdir -p "$objdir"
export FUZZ_OBJDIR="$objdir" FUZZ_FLAGS="${flags[*]} -isystem $fmt_include"
compile_one() {  # source -> $FUZZ_OBJDIR/<source with / as _>.o
  local o="$FUZZ_OBJDIR/${1//\//_}.o"
  # shellcheck disable=SC2086
  clang++ $FUZZ_FLAGS -c "$1" -o "$o.tmp" && mv "$o.tmp" "$o"
}
export -f compile_one
object_of() { echo "$objdir/${1//\//_}.o"; }
mapfile -t all_sources < <(for t in "${targets[@]}"; do
  printf '%s\n' "tests/fuzz/$t.cpp" ${sources[$t]} "${common[@]}"; done | sort -u)
stale=()
for s in "${all_sources[@]}"; do
  o="$(object_of "$s")"
  if [ ! -f "$o" ] || [ -n "$(find "$s" include/dde/data include/dde/util include/dde/checkpoint tests/fuzz \
         -newer "$o" -print -quit)" ]; then
    stale+=("$s")
  fi
done
if [ "${#stale[@]}" -gt 0 ]; then
  echo "fuzz: compiling ${#stale[@]} sources"
  printf '%s\n' "${stale[@]}" | xargs -P "$(nproc)" -I{} bash -c 'compile_one "$1"' _ {} \
    || { echo "fuzz: a source failed to compile (above)" >&2; exit 1; }
fi
for t in "${targets[@]}"; do
  objects=()
  # shellcheck disable=SC2206
  for s in "tests/fuzz/$t.cpp" ${sources[$t]} "${common[@]}"; do objects+=("$(object_of "$s")"); done
  if [ ! -x "$out/$t" ] || [ -n "$(find "${objects[@]}" -newer "$out/$t" -print -quit)" ]; then
    echo "fuzz: linking $t"
    # shellcheck disable=SC2086
    clang++ -fsanitize=fuzzer,address,undefined "${objects[@]}" ${libs[$t]:-} -o "$out/$t.tmp"
    mv "$out/$t.tmp" "$out/$t"
  fi
done
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}"
# Every UBSan report stops the run, but for the third-party quirks in tests/fuzz/ubsan.supp.
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:suppressions=$root/tests/fuzz/ubsan.supp}"
for t in "${targets[@]}"; do
  regressions="tests/fuzz/regressions/$t"
  if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
    echo "fuzz: $t replays $(ls "$regressions" | wc -l) regression inputs"
    "$out/$t" -rss_limit_mb=2048 -timeout=10 "$regressions"/* 2>"$out/$t.replay.log" \
      || { cat "$out/$t.replay.log"; echo "fuzz: $t failed on a regression input" >&2; exit 1; }
  fi
done
[ "$seconds" -gt 0 ] || { echo "fuzz: ok (replay only)"; exit 0; }
# One libFuzzer process per CPU at a time (each is single-threaded).
export FUZZ_OUT="$out" FUZZ_ROOT="$root" FUZZ_SECONDS="$seconds"
fuzz_one() {  # target dictionary (- for none)
  local t="$1" dict=()
  mkdir -p "$FUZZ_OUT/corpus/$t"
  if [ "${2:--}" != - ]; then dict=(-dict="$FUZZ_ROOT/$2"); fi
  # A fixed seed and a fixed number of runs (time only as a bound): the test command's short run
  # explores the same inputs every time, so CI does not pass or fail by chance.
  (cd "$FUZZ_OUT" && "./$t" -seed=1 -runs=$((FUZZ_SECONDS * 4000)) -max_total_time=$((FUZZ_SECONDS * 5)) \
      -rss_limit_mb=2048 -timeout=10 -max_len=65536 "${dict[@]}" \
      -print_final_stats=1 "corpus/$t" "$FUZZ_ROOT/tests/fuzz/seeds/$t" >"$t.log" 2>&1) \
    || { tail -50 "$FUZZ_OUT/$t.log"; echo "fuzz: $t found a failure (input in $FUZZ_OUT)" >&2; return 1; }
}
export -f fuzz_one
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, $(nproc) at a time"
for t in "${targets[@]}"; do printf '%s %s\n' "$t" "${dicts[$t]:--}"; done \
  | xargs -P "$(nproc)" -n 2 bash -c 'fuzz_one "$@"' _ || exit 1
for t in "${targets[@]}"; do
  echo "fuzz: $t $(grep -E "stat::number_of_executed_units|stat::new_units_added" "$out/$t.log" | tr '\n' ' ')"
done
echo "fuzz: ok"
