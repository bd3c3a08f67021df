#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh, Debian's chromium), then runs the linter and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
