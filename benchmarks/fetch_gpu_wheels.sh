#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch but not our other packages (no network there):
# downloaded here into .whl/ (git-ignored), installed there by gpu_session.sh. The versions
# are those the test environment resolved when the GPU figures were first planned (pip list
# of .venv); torch stays the machine's own.
set -euo pipefail
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >>.git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    diffusers==0.42.1 transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
    truststore segment-anything==1.0 tokenizers==0.23.3 importlib_metadata
du -sh .whl
