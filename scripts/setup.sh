#!/usr/bin/env bash
# Installs what dde needs on a fresh Debian 12 machine, idempotently: Debian -dev packages
# for the C++ libraries, and a project virtual environment (.venv) with the pinned wheels
# of requirements.txt (torch's bundled LibTorch is what the C++ code links).
# A second run checks and returns in seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

debian_packages=(build-essential cmake libyaml-cpp-dev libspdlog-dev libcli11-dev
                 nlohmann-json3-dev libstb-dev libgtest-dev libgloo-dev
                 libturbojpeg0-dev libssl-dev libclang-rt-14-dev libicu-dev)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: nvcc not found. The torch wheel is CUDA-enabled and its CMake config needs the" >&2
  echo "       CUDA toolkit at configure time; install it (it is preinstalled on our build machines)." >&2
  exit 1
fi

python_bin="${DDE_BOOTSTRAP_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
stamp=.venv/.dde-requirements.sha256
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned Python packages (requirements.txt)"
  .venv/bin/python -m pip install --progress-bar on --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
