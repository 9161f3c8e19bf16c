#!/usr/bin/env bash
# Set up (scripts/setup.sh, and vLLM in its own environment: scripts/setup_vllm.sh) and run the whole test suite
# with ruff; what CI runs. SD2_TEST_WITHOUT_VLLM=1 skips the vLLM set-up (its tests then skip, except in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${SD2_TEST_WITHOUT_VLLM:-0}" != 1 ]; then
  bash scripts/setup_vllm.sh
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
