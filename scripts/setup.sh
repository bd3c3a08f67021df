#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtualenv in .venv with the project and its test tools.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels onto a CPU machine.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") to the build you want.
if python -c "import torch, diffusers, transformers, gradio, moslora_diffusion" 2>/dev/null; then
  echo "set-up: .venv is ready; checking that nothing is missing"
else
  echo "set-up: installing torch (${TORCH_SPEC:-torch==2.13.0}), diffusers, transformers, gradio and the project" \
       "into .venv: about 1.7 GB, 2-3 minutes on a fast connection"
fi
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "set-up: done"
