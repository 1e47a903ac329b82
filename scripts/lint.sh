#!/usr/bin/env bash
# Style gates: clang-format (every C++ file) and clang-tidy (.clang-tidy, warnings are errors).
# clang-tidy cannot read GCC's precompiled headers, so it uses its own configure-only tree.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="/usr/local/cuda/bin:$PATH"
mapfile -t files < <(git ls-files '*.cpp' '*.hpp')
clang-format --dry-run --Werror "${files[@]}"
echo "lint: clang-format ok (${#files[@]} files)"
if [ "${DDE_SKIP_TIDY:-0}" = 1 ]; then exit 0; fi
tidy_dir="$root/build-tidy"
# clang-tidy's cost is LibTorch's headers, parsed and matched once per translation unit (~35 s):
# it reads the unity batches of a unity build (DDE_UNITY), so the headers are paid once per batch
# of 64 sources instead of once per source. The batches include our .cpp files, so
# bugprone-suspicious-include is off for them and replaced by the grep below.
# Configured every time (seconds when cached): the batches follow the sources as they are now.
cmake -S "$root" -B "$tidy_dir" -DDDE_PCH=OFF -DDDE_UNITY=ON -DDDE_UNITY_BATCH=64 >/dev/null 2>&1 ||
  cmake -S "$root" -B "$tidy_dir" -DDDE_PCH=OFF -DDDE_UNITY=ON -DDDE_UNITY_BATCH=64 >/dev/null
if git grep -nE '#include ".*\.(cpp|cc|cxx)"' -- 'src/*' 'include/*' 'tests/cpp/*'; then
  echo "lint: a source file is #included (above)" >&2
  exit 1
fi
mapfile -t sources < <("$root/.venv/bin/python" - "$tidy_dir" "$root" <<'PY'
import json, sys
tidy, root = sys.argv[1], sys.argv[2]
for entry in json.load(open(f"{tidy}/compile_commands.json")):
    f = entry["file"]
    if "/Unity/unity_" in f or f.startswith((f"{root}/src/", f"{root}/tests/cpp/")):
        print(f)
PY
)
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -n 1 clang-tidy -p "$tidy_dir" --quiet \
  --checks=-bugprone-suspicious-include --extra-arg=-Wno-unknown-warning-option 2>&1 \
  | grep -v -E '^[0-9]+ warnings? generated|^Suppressed|^Use -header-filter' | tee "$tidy_dir/tidy.log" || true
if grep -qE 'error:|warning:' "$tidy_dir/tidy.log"; then
  echo "lint: clang-tidy found problems (above)" >&2
  exit 1
fi
echo "lint: clang-tidy ok (${#sources[@]} translation units)"
