#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite with ruff; what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
