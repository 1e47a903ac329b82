#!/usr/bin/env bash
# Downloads, on this (Debian 12, x86-64) machine, the .deb files that bench/gpu_check.sh unpacks on
# a GPU machine that has CUDA, CMake, a compiler and torch but none of our C++ -dev libraries and
# no network: the -dev packages of scripts/setup.sh plus the shared libraries they link.
# Writes them into .debs/ (git-ignored); the device call carries that folder. Also downloads into
# .whl/ (git-ignored) the wheels, for the image's Python 3.12, of the pinned Python packages the GPU
# image lacks or holds at other versions (requirements.txt: diffusers, transformers, tokenizers,
# huggingface_hub), which gpu_check.sh installs into a target folder with pip --no-index.
#   bash bench/fetch_debs.sh [DEST]        (default DEST: .debs in the repository root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.debs}"

# -dev packages (headers, CMake configs) and the runtime libraries they link against.
packages=(libyaml-cpp-dev libyaml-cpp0.7
          libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
          libcli11-dev nlohmann-json3-dev
          libstb-dev libstb0
          libgtest-dev libgmock-dev
          libgloo-dev)

if ! command -v apt-get >/dev/null 2>&1; then
  echo "fetch_debs: apt-get not found: run this on a Debian/Ubuntu machine" >&2
  exit 1
fi
mkdir -p "$dest"
cd "$dest"
# apt-get download needs the package lists; refresh them once if a name is unknown.
if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -q
fi
rm -f ./*.deb
apt-get download "${packages[@]}"
count=$(find . -maxdepth 1 -name '*.deb' | wc -l)
if [ "$count" -ne "${#packages[@]}" ]; then
  echo "fetch_debs: expected ${#packages[@]} .deb files in $dest, found $count" >&2
  exit 1
fi
echo "fetch_debs: $count packages ($(du -sh . | cut -f1)) in $dest"

wheels="$root/.whl"
mkdir -p "$wheels"
rm -f "$wheels"/*.whl
pins=()
for name in diffusers transformers tokenizers huggingface_hub; do
  pins+=("$(grep -E "^${name}==" "$root/requirements.txt")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
"$root/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$wheels" "${pins[@]}"
echo "fetch_debs: wheels $(cd "$wheels" && echo *.whl) in $wheels"
