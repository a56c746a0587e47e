#!/usr/bin/env bash
# CI: install Azurite, the Azure Storage emulator, for the az:// tests (tests/cloud_fixtures.py;
# without it they skip). Idempotent: does nothing when azurite-blob is on PATH. Needs npm.
set -euo pipefail
if command -v azurite-blob >/dev/null 2>&1; then
  echo "azurite present: $(azurite-blob --version 2>/dev/null || command -v azurite-blob)"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is needed to install Azurite (apt-get install -y npm, or Node.js from nodejs.org)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ] && [ ! -w "$(npm prefix -g)" ]; then SUDO="sudo"; fi
$SUDO npm install -g azurite@3.37.0
azurite-blob --version
