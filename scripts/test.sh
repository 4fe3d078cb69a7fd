#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), checks the code with ruff, runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
exec python -m pytest "$@"
