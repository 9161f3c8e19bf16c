"""Benchmark: distillation on transformers (batched `generate`) and on vLLM (a `vllm serve` sd2 starts), as JSON.

    .venv/bin/python bench/distill_engines.py --out bench/results/distill_engines.json

The same rows the cpu profile distils (the embedded sources: 48 general, 8 translation, 8 math = 64 rows), the
same DistillConfig (128 new tokens, temperature 0.9, top-p 1), through sd2's own `distill_rows`. transformers
runs `batch_size` prompts per `generate` call (the profile's 8); vLLM gets every row of a source in flight at
once (its continuous batching is the point of it). Tokens/s counts generated tokens over generation time; the
vLLM server's start-up is reported apart. Needs vLLM: bash scripts/setup_vllm.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def run(engine: str, folder: Path, sources, cfg, threads: int) -> dict:
    from sd2_core.data.sources import load_source
    from sd2_core.distill import distill_rows, vllm_settings
    from sd2_core.generation import make_generator
    from sd2_core.models import load_model, load_tokenizer
    from sd2_core.placement import placement_of

    tokenizer = load_tokenizer(folder)
    rows = [row for spec in sources for row in load_source(spec)]
    by_kind: dict[str, list] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    tokens = seconds = 0.0
    extra: dict = {}
    if engine == "transformers":
        torch.set_num_threads(threads)
        generator = make_generator(
            "transformers", model=load_model(folder), tokenizer=tokenizer, batch_size=cfg.batch_size
        )
        for kind_rows in by_kind.values():
            _, stats = distill_rows(generator, kind_rows, cfg)
            tokens += stats["generated_tokens"]
            seconds += stats["seconds"]
        extra["batch_size"] = cfg.batch_size
    else:
        from transformers import GenerationConfig

        from sd2_core.vllm_server import vllm_server

        start = time.perf_counter()
        with vllm_server(folder, **vllm_settings(cfg, placement_of(cfg))) as server:
            extra["server_start_s"] = round(time.perf_counter() - start, 1)
            extra["engine"] = server.install.label
            generator = make_generator(
                "vllm", tokenizer=tokenizer, server=server, generation_config=GenerationConfig.from_pretrained(folder)
            )
            for kind_rows in by_kind.values():
                whole = cfg.model_copy(update={"batch_size": len(kind_rows)})  # every row of the source in flight
                _, stats = distill_rows(generator, kind_rows, whole)
                tokens += stats["generated_tokens"]
                seconds += stats["seconds"]
        extra["in_flight"] = "every row of a source"
    return {"rows": len(rows), "tokens": int(tokens), "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2), **extra}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from sd2_core.config import profile
    from sd2_core.models import builtin_dir
    from sd2_core.vllm_server import require_vllm

    require_vllm()
    cell = profile("cpu")
    folder = builtin_dir("smollm2-135m-instruct")
    cfg = cell.distill.model_copy(update={"backend": "auto"})
    engines = {name: run(name, folder, cell.sources, cfg, args.threads) for name in ("transformers", "vllm")}
    result = {
        "benchmark": "distill_engines",
        "model": "smollm2-135m-instruct",
        "distill": cfg.model_dump(mode="json", exclude={"backend"}),
        "engines": engines,
        "vllm_over_transformers": round(
            engines["vllm"]["tokens_per_second"] / engines["transformers"]["tokens_per_second"], 3
        ),
        "target_ratio": 1.5,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
