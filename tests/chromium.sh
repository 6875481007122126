#!/usr/bin/env bash
# Make a headless Chromium available (Debian's package) for tests/test_report.py and
# tests/bench/report_screenshot.py. Idempotent: prints the browser's path and does nothing else when
# it is installed already. Exits non-zero, saying why, when it cannot install it (needs root and apt-get).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
for candidate in chromium chromium-browser; do
  if have "$candidate"; then command -v "$candidate"; exit 0; fi
done
if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "chromium.sh: Chromium is missing; install Debian's 'chromium' package (needs root and apt-get)" >&2
  exit 1
fi
echo "chromium.sh: installing Debian's chromium package" >&2
apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
