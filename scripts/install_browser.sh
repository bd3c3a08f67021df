#!/usr/bin/env bash
# Debian's chromium for the web app's browser test (driven by playwright; never `playwright install`,
# which downloads its own browser). Under CI a failed install is an error; elsewhere the test skips.
set -uo pipefail
[ -x /usr/bin/chromium ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if $SUDO apt-get update -qq && \
   $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; then
  exit 0
fi
if [ -n "${CI:-}" ]; then
  echo "error: could not install chromium, which the browser test needs under CI" >&2
  exit 1
fi
echo "note: chromium could not be installed; the web app's browser test will be skipped" >&2
