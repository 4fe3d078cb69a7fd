#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs qemu-bmc on this machine: `scripts/up.sh [-c FILE]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/qemu-bmc up "$@"
