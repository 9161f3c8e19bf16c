"""Benchmark: median forward latency of ONE decode step at a fixed context, the SD² paper's way, written as JSON.

    .venv/bin/python bench/decode_latency.py --out bench/results/decode_latency.json
    .venv/bin/python bench/decode_latency.py --draft /path/to/pruned-draft --mal 2.1 --k 5 --out ...

`sd2_core.latency.decode_step_latency`: a KV cache of `--context` seeded random tokens from one prefill, then one
new token per sequence timed by torch.utils.benchmark's blocked_autorange for at least `--min-run-time` seconds
(paper: >= 20 s), the cache cropped back after every step. Default model: the embedded SmolLM2-135M-Instruct
(fp32, this machine's CPU). With `--draft`, the draft is timed the same way and c_lat = draft / target median is
written, beside c from MACs at the same context; with `--mal` too, the practical and theoretical improvement
factors MAL / (k·c + 1). Compressed sparse formats this device supports are timed as well (none on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def measure(name: str, folder: Path, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """One model's dense decode-step latency and its compressed formats (each with why it is (not) supported)."""
    from sd2_core.latency import decode_step_latency, format_latencies
    from sd2_core.models import load_model
    from sd2_core.placement import resolve_placement

    placement = resolve_placement(args.device, args.dtype)
    model = load_model(folder, placement.dtype, placement.device)
    dense = decode_step_latency(model, args.context, args.min_run_time, args.batch_size, args.threads)
    formats = format_latencies(model, dense, args.context, args.min_run_time, args.batch_size, args.threads)
    row = {
        "model": name,
        **{k: v for k, v in dense.items() if k not in ("median_s", "iqr_s", "mean_s")},
        "median_ms": round(dense["median_s"] * 1e3, 4),
        "iqr_ms": round(dense["iqr_s"] * 1e3, 4),
        "mean_ms": round(dense["mean_s"] * 1e3, 4),
        "formats": formats,
    }
    print(name, json.dumps({k: v for k, v in row.items() if k != "formats"}), flush=True)
    return model, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF folder (target)")
    parser.add_argument("--draft", help="local HF folder of a draft to time against the target (c_lat)")
    parser.add_argument("--mal", type=float, help="the draft's MAL, for the improvement factors")
    parser.add_argument("--k", type=int, default=5, help="draft tokens per step, for the improvement factors")
    parser.add_argument("--context", type=int, default=256, help="tokens in the KV cache before the timed step")
    parser.add_argument("--min-run-time", type=float, default=20.0, help="seconds of blocked_autorange per model")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from sd2_core.latency import machine_identity, practical_improvement_factor
    from sd2_core.macs import macs_per_token
    from sd2_core.models import builtin_dir, is_builtin
    from sd2_core.placement import resolve_placement

    target_dir = builtin_dir(args.model) if is_builtin(args.model) else Path(args.model)
    load_avg_before = os.getloadavg()[0]
    target, target_row = measure(args.model, target_dir, args)
    result: dict = {
        "benchmark": "decode_latency",
        "method": "median of torch.utils.benchmark blocked_autorange over one decode step (one new token per "
        "sequence) against a DynamicCache of exactly `context_len` positions, cropped back after each step",
        "target": target_row,
        "target_macs_per_token": macs_per_token(target, args.context)["total"],
    }
    if args.draft:
        draft, draft_row = measure(args.draft, Path(args.draft), args)
        c = macs_per_token(draft, args.context)["total"] / result["target_macs_per_token"]
        c_lat = draft_row["median_ms"] / target_row["median_ms"]
        result.update(draft=draft_row, c_macs_at_context=round(c, 4), c_lat=round(c_lat, 4))
        if args.mal is not None:
            seconds = (draft_row["median_ms"] / 1e3, target_row["median_ms"] / 1e3)
            factors = practical_improvement_factor(args.mal, args.k, *seconds, c=c)
            result["improvement_factors"] = {k: round(v, 4) for k, v in factors.items()}
    placement = resolve_placement(args.device, args.dtype)
    result["machine"] = {
        **machine_identity(placement.device, args.threads),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "load_avg_1m_before": load_avg_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
