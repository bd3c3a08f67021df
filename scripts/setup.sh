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
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --disable-pip-version-check -e ".[test]"
