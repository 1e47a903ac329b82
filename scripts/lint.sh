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
[ -f "$tidy_dir/compile_commands.json" ] || cmake -S "$root" -B "$tidy_dir" -DDDE_PCH=OFF >/dev/null
mapfile -t sources < <(git ls-files 'src/*.cpp' 'tests/cpp/*.cpp')
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -n 1 clang-tidy -p "$tidy_dir" --quiet 2>&1 \
  | grep -v -E '^[0-9]+ warnings? generated|^Suppressed|^Use -header-filter' | tee "$tidy_dir/tidy.log" || true
if grep -qE 'error:|warning:' "$tidy_dir/tidy.log"; then
  echo "lint: clang-tidy found problems (above)" >&2
  exit 1
fi
echo "lint: clang-tidy ok (${#sources[@]} files)"
