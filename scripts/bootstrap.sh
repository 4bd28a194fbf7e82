#!/usr/bin/env bash
# Set up a fresh machine for splitserve: system packages, a virtual environment in .venv,
# torch first (2.13.0 resolves to the CPU build on CPU-only machines, no CUDA wheels), then
# the project with its extras. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${SPLITSERVE_EXTRAS:-dev}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[bootstrap] installing redis-server (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  python3 -m venv .venv
fi
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing torch==2.13.0"
  $py -m pip install -q --upgrade pip
  $py -m pip install -q torch==2.13.0
fi
stamp=.venv/.splitserve-$(cat pyproject.toml | md5sum | cut -c1-12)-$extras
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing splitserve[$extras]"
  $py -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
echo "[bootstrap] ready: $($py -c 'import torch; print("torch", torch.__version__)')"
