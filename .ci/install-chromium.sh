#!/usr/bin/env bash
# CI: install Debian's chromium for tests/test_report_html.py (headless render of report.html).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo) and apt.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
/usr/bin/chromium --version
