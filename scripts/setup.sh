#!/usr/bin/env bash
# Set up mace-ray in ./.venv on a fresh machine: torch first (so pip does not pull another
# torch build for the other packages), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${MACE_TORCH:-torch==2.14.1}
TORCHVISION=${MACE_TORCHVISION:-torchvision==0.29.1}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "$TORCH" "$TORCHVISION"
fi
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/mace-ray --help >/dev/null
echo "mace-ray is set up in .venv"
