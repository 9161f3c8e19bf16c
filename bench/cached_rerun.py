"""Benchmark: wall time of a sweep and of its cached rerun (every stage a cache hit), written as JSON.

    .venv/bin/python bench/cached_rerun.py --profile smoke --out bench/results/cached_rerun_smoke.json
    .venv/bin/python bench/cached_rerun.py --profile cpu --store /path/to/store --out ...

Without PREFECT_API_URL a temporary local Prefect server runs for both sweeps (its start-up is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--variants", nargs="+", help="default: the grid's default variants")
    parser.add_argument("--store", default="./sd2-bench-store")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    from flows.sweep import sweep_flow
    from sd2.prefect_server import prefect_api
    from sd2_core.config import GridConfig

    fields = {"name": f"bench-{args.profile}", "profile": args.profile, "store": args.store}
    if args.profile == "smoke":
        fields.update(targets=["tiny-random-llama"], drafts=["tiny-random-llama"])
    if args.variants:
        fields["variants"] = args.variants
    grid = GridConfig(**fields)

    timings = []
    with prefect_api():  # one server for both runs; its start-up is not timed
        for _ in range(2):
            start = time.perf_counter()
            state = sweep_flow(grid=grid, return_state=True)
            timings.append(round(time.perf_counter() - start, 2))
            summary = state.result(raise_on_failure=False)
            if not state.is_completed():
                raise SystemExit(f"sweep did not complete: {state.message}")
    result = {
        "benchmark": "cached_rerun",
        "grid": grid.model_dump(mode="json"),
        "cells": summary["cells"],
        "first_run_s": timings[0],
        "cached_rerun_s": timings[1],
        "results": summary["results"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
