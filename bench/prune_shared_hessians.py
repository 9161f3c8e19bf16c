"""Benchmark: SparseGPT on SmolLM2-135M-Instruct with shared Hessians (q/k/v, gate/up) against one per Linear.

    .venv/bin/python bench/prune_shared_hessians.py --out bench/results/prune_shared_hessians.json

Same model, calibration (the shipped text, 16 × 256 tokens by default) and sparsities through
`prune_model(share_hessians=True | False)`; records wall time and checks that masks are identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts (noise)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    from sd2_core.config import CalibrationConfig
    from sd2_core.data.calibration import load_calibration
    from sd2_core.models import builtin_dir, load_model, load_tokenizer
    from sd2_core.pruning.model_pruner import prune_model
    from sd2_core.pruning.structure import decoder_linears

    path = builtin_dir("smollm2-135m-instruct")
    dense, tokenizer = load_model(path), load_tokenizer(path)
    ids, mask = load_calibration(tokenizer, CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len))
    runs = []
    for sparsity in args.sparsities:
        masks, row = {}, {"sparsity": sparsity}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for shared in (False, True):  # interleaved, so a busy spell of the machine hits both
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                prune_model(model, ids, mask, sparsity, share_hessians=shared)
                times[shared].append(round(time.perf_counter() - start, 2))
                masks[shared] = {n: m.weight != 0 for n, m in decoder_linears(model).items()}
        row["separate_s"], row["shared_s"] = min(times[False]), min(times[True])
        row["all_s"] = {"separate": times[False], "shared": times[True]}
        row["speedup"] = round(row["separate_s"] / row["shared_s"], 3)
        row["masks_identical"] = all(torch.equal(masks[True][n], masks[False][n]) for n in masks[True])
        runs.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "prune_shared_hessians",
        "model": "smollm2-135m-instruct",
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "runs": runs,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
