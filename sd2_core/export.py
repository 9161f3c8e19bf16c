"""A drafter folder that `vllm serve TARGET --speculative-config '{"model": DIR, ...}'` loads as it is.

What vLLM reads: one safetensors file, config.json, generation_config.json, the tokenizer and its chat template,
all copied as they are. Beside them `sd2_sparsity.json` says what sd2 measured: the pattern the weights follow
(2:4 checked group by group, or unstructured) and each decoder Linear's zero fraction.

Why no compressed-tensors `sparsity_config` in config.json: vLLM 0.32 (the release sd2 pins, CPU and CUDA)
refuses to load a model whose compressed-tensors config names sparse targets ("Sparsity support has been removed
from compressed-tensors", vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py), so
that metadata would make the drafter unloadable; its 2:4 kernels are gone with it. The zeros stay in the dense
weights, and `sd2_sparsity.json` keeps the facts for an engine that can use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sd2_core.errors import UserError

SPARSITY_FILE = "sd2_sparsity.json"


def _follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """At least n zeros in every group of m consecutive inputs of every row (a valid N:M pruning)."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) == 0).sum(dim=2) >= n).all())


def sparsity_record(folder: Path) -> dict[str, Any]:
    """Zero fraction of every 2-D decoder weight, overall, and whether all of them follow 2:4."""
    per_module: dict[str, float] = {}
    zeros = total = 0
    two_four = True
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if ".layers." not in name or not name.endswith(".weight"):
                continue
            weight = f.get_tensor(name)
            if weight.dim() != 2:
                continue
            z = int((weight == 0).sum())
            per_module[name.removesuffix(".weight")] = z / weight.numel()
            zeros, total = zeros + z, total + weight.numel()
            two_four = two_four and _follows_nm(weight, 2, 4)
    if not per_module:
        raise UserError(f"{folder}/model.safetensors holds no decoder-layer weights; is it a causal LM folder?")
    overall = zeros / total
    structure = "2:4" if two_four and overall >= 0.49 else ("unstructured" if overall > 0.01 else "dense")
    return {"structure": structure, "overall": overall, "per_module": per_module}


def export_drafter(src: Path, out: Path) -> dict[str, Any]:
    """Copy the model folder `src` into the new or empty folder `out` as a vLLM drafter; what was written."""
    from sd2_core.models import copy_model_files

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pass an empty or new folder")
    missing = [name for name in ("config.json", "tokenizer.json") if not (src / name).exists()]
    if missing:
        raise UserError(f"model folder {src} lacks {', '.join(missing)}; a drafter needs its config and tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    files = copy_model_files(src, out)
    record = sparsity_record(out)
    (out / SPARSITY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return {"out": str(out.resolve()), "files": [*files, SPARSITY_FILE], "sparsity": record["overall"],
            "structure": record["structure"]}  # fmt: skip


def serve_line(target: str, drafter: Path, k: int = 5) -> str:
    """The `vllm serve` line that runs `target` with this drafter (what the README and `sd2 export` show)."""
    spec = json.dumps({"model": str(drafter), "method": "draft_model", "num_speculative_tokens": k})
    return f"vllm serve {target} --speculative-config '{spec}'"
