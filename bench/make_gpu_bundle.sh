#!/usr/bin/env bash
# Makes, here, the folder that the GPU check runs from on a GPU machine that has CUDA and python3
# with torch 2.11.0 but none of our C++ libraries and no network, so that nothing is built there:
#   bin/        dde_train, dde_encode_cache, tests/cpp/dde_tests (and dde_fake_device_tests when
#               built), stripped
#   lib/        the shared libraries they need besides glibc, libstdc++, libgcc_s, torch's and
#               NVIDIA's (those come from the GPU machine and its torch wheel): yaml-cpp, spdlog,
#               fmt, stb, libjpeg-turbo, ... (and libdde_fake_device.so), found with ldd
#   lib-extra/  libraries a python3 image has (libcrypto, libssl, libz) and ICU, xz-compressed: unpacked
#               and used there only when the machine lacks them, so that they never shadow what
#               its Python loads
#   wheels/     the pinned Python packages the GPU image lacks or holds at other versions
#               (requirements.txt: diffusers, transformers, tokenizers, huggingface_hub), for
#               python 3.12, installed there with pip --no-index into a target folder
#   fixtures/   export/ and shards/ of the tiny fixtures (scripts/prepare_tiny.sh)
#   gpu_check.sh, bundle.env (git revision, paths compiled into the binaries), MANIFEST.txt
# The binaries keep their own RUNPATH; gpu_check.sh runs them with
# LD_LIBRARY_PATH=<bundle>/lib:<torch>/lib:<site-packages>/nvidia/*/lib of the machine's python3.
#
#   bash bench/make_gpu_bundle.sh [--out DIR] [--build DIR] [--fixtures DIR] [--no-wheels]
#                                 [--max-mib N]
# Defaults: --out gpu_bundle (git-ignored), --build $DDE_BUILD_DIR or build, --fixtures
# $DDE_FIXTURES_DIR or fixtures, --max-mib 50 (fails above it). --no-wheels skips the download
# (gpu_check.sh --dry-run uses it: the .venv has the pinned packages). Prints the size at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

out="$root/gpu_bundle"
build="${DDE_BUILD_DIR:-$root/build}"
fixtures="${DDE_FIXTURES_DIR:-$root/fixtures}"
wheels=1
max_mib=50
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --fixtures) fixtures="$2"; shift 2 ;;
    --no-wheels) wheels=0; shift ;;
    --max-mib) max_mib="$2"; shift 2 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "make_gpu_bundle: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
die() { echo "make_gpu_bundle: $*" >&2; exit 1; }
py="$root/.venv/bin/python"
[ -x "$py" ] || die "$py missing: run scripts/setup.sh"
build="$(cd "$build" 2>/dev/null && pwd)" || die "no build folder: run scripts/build.sh"

binaries=(dde_train dde_encode_cache tests/cpp/dde_tests)
for b in "${binaries[@]}"; do
  [ -x "$build/$b" ] || die "$build/$b missing: run scripts/build.sh"
done
[ -x "$build/tests/cpp/dde_fake_device_tests" ] && binaries+=(tests/cpp/dde_fake_device_tests)
for need in export/sd15/manifest.json export/sdxl/manifest.json shards/sd15/index.json \
            shards/sd15_eval/index.json shards/sdxl/index.json shards/sdxl_eval/index.json; do
  [ -f "$fixtures/$need" ] || die "$fixtures/$need missing: run scripts/prepare_tiny.sh"
done

# Where this machine's torch and NVIDIA libraries are: ldd resolves them there, and they stay out.
read -r torch_dir torch_version < <("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__), torch.__version__)')
site="$(dirname "$torch_dir")"
torch_path="$torch_dir/lib"
for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && torch_path="$torch_path:$d"; done

case "$out" in /*) ;; *) out="$root/$out" ;; esac
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/lib-extra" "$out/fixtures"

# Binaries, stripped (a RelWithDebInfo build carries hundreds of MB of debug info).
for b in "${binaries[@]}"; do
  strip --strip-all -o "$out/bin/$(basename "$b")" "$build/$b"
done
if [ -f "$build/tests/cpp/libdde_fake_device.so" ]; then
  strip --strip-unneeded -o "$out/lib/libdde_fake_device.so" "$build/tests/cpp/libdde_fake_device.so"
fi

# Shared libraries: everything ldd resolves that is not glibc's, GCC's runtime, torch's, NVIDIA's
# or the driver's. The binaries' RUNPATH (this machine's torch) is kept: absent there, harmless.
system_re='^(linux-vdso\.so|ld-linux-x86-64\.so|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libutil\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libnvidia-)'
# ICU (the caption tokenizer's Unicode) too: 31 MB of data that xz makes 8, and a GPU image may
# hold another ICU version (another soname) beside which the bundle's is used.
extra_re='^(libcrypto\.so|libssl\.so|libz\.so|libicu(uc|i18n|data)\.so)'
declare -A seen=()
for f in "$out"/bin/* "$out"/lib/libdde_fake_device.so; do
  [ -e "$f" ] || continue
  listing="$(env -i LD_LIBRARY_PATH="$out/lib:$torch_path" ldd "$f")" || die "ldd $f failed"
  if grep -q "not found" <<<"$listing"; then
    die "$(basename "$f"): unresolved libraries here:"$'\n'"$(grep "not found" <<<"$listing")"
  fi
  while read -r name _ path _; do
    [[ "$path" == /* ]] || continue
    [[ "$name" =~ $system_re ]] && continue
    case "$path" in "$site"/torch/* | "$site"/nvidia/* | "$out"/*) continue ;; esac
    [ -n "${seen[$name]:-}" ] && continue
    seen[$name]=1
    if [[ "$name" =~ $extra_re ]]; then
      "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb", preset=9))' \
        "$path" "$out/lib-extra/$name.xz"
    else
      cp -L "$path" "$out/lib/$name"
    fi
  done < <(grep "=>" <<<"$listing")
done

# The tiny fixtures the GPU check trains on (the source pipelines are not needed there).
cp -r "$fixtures/export" "$fixtures/shards" "$out/fixtures/"

# Wheels of the pinned packages the GPU image lacks (diffusers) or holds at other versions
# (transformers 5, tokenizers 0.23, huggingface_hub 1.x there); their own requirements
# (filelock, numpy, regex, requests, safetensors, pyyaml, tqdm, fsspec, ...) are in the image.
if ((wheels)); then
  mkdir -p "$out/wheels"
  pins=()
  for name in diffusers transformers tokenizers huggingface_hub; do
    pin="$(grep -E "^${name}==" requirements.txt)" || die "no pin of $name in requirements.txt"
    pins+=("$pin")
  done
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$out/wheels" "${pins[@]}"
  count=$(find "$out/wheels" -name '*.whl' | wc -l)
  [ "$count" -eq "${#pins[@]}" ] || die "expected ${#pins[@]} wheels, got $count"
fi

cp bench/gpu_check.sh "$out/gpu_check.sh"
# DDE_SOURCE_DIR compiled into dde_tests (tests/cpp/CMakeLists.txt): its configs/ test reads it.
source_dir="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt")"
rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- 2>/dev/null || rev="$rev+working-tree"
glibc="$(objdump -T "$out"/bin/* "$out"/lib/* 2>/dev/null | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1)"
cuda=0
readelf -d "$out/bin/dde_train" | grep -q 'libtorch_cuda.so' && cuda=1
{
  printf 'BUNDLE_GIT=%q\n' "$rev"
  printf 'BUNDLE_DATE=%q\n' "$(date -u +%FT%TZ)"
  printf 'BUNDLE_BUILD_DIR=%q\n' "$build"
  printf 'BUNDLE_SOURCE_DIR=%q\n' "$source_dir"
  printf 'BUNDLE_TORCH=%q\n' "$torch_version"
  printf 'BUNDLE_CUDA=%q\n' "$cuda"
  printf 'BUNDLE_GLIBC_NEEDED=%q\n' "$glibc"
} >"$out/bundle.env"
manifest="$(cd "$out" && find . -type f -printf '%s %P\n' | sort -k2)"
echo "$manifest" >"$out/MANIFEST.txt"

bytes=$(du -sb "$out" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
files=$(find "$out" -type f | wc -l)
names() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f ' | sed 's/ $//'; }
echo "make_gpu_bundle: bin $(du -sh "$out/bin" | cut -f1), lib $(du -sh "$out/lib" | cut -f1) ($(names "$out/lib")),"\
  "lib-extra $(du -sh "$out/lib-extra" | cut -f1) ($(names "$out/lib-extra")), fixtures $(du -sh "$out/fixtures" | cut -f1)," \
  "wheels $( ((wheels)) && du -sh "$out/wheels" | cut -f1 || echo none); needs $glibc, torch $torch_version, CUDA build $cuda"
echo "make_gpu_bundle: $out: $mib MiB ($bytes bytes, $files files)"
if awk -v b="$bytes" -v m="$max_mib" 'BEGIN { exit !(b > m * 1048576) }'; then
  die "the bundle is over --max-mib $max_mib"
fi
