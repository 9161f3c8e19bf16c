"""Benchmark: sd2's speculative decoding (the MAL loop) against transformers' assisted generation, written as JSON.

    .venv/bin/python bench/mal_vs_assisted.py --out bench/results/mal_vs_assisted.json
    .venv/bin/python bench/mal_vs_assisted.py --draft /path/to/pruned-draft --out ...

Same target/draft pair (default: the embedded SmolLM2-135M-Instruct as both), the same chat-formatted SpecBench
prompts (first N per category, first turn), k drafted tokens per step, greedy, max_new_tokens each. Three engines:
plain greedy `target.generate`, `target.generate(assistant_model=draft)` with a constant k and no confidence
threshold, and `sd2_core.specdec.speculative_generate` with a `ModelDrafter`, one sequence at a time. Each is
warmed up once, then timed on every prompt (the engines take turns prompt by prompt). Then the MAL stage's own
path, `sd2_core.mal.measure_mal` with `--batch-size` sequences decoded together (each with its own acceptance),
is timed on the same prompts and its outputs checked against the greedy ones. An untimed pass with forward hooks
splits each one-at-a-time speculative engine's time into target forwards, draft forwards and the rest (Python,
argmax, cache bookkeeping); `--profile` (or sd2 being slower than assisted generation) adds a cProfile of sd2's loop.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import time
from pathlib import Path

import torch


class ForwardClock:
    """Counts and times the top-level forward calls of a model (hooks; removed by close())."""

    def __init__(self, model):
        self.calls, self.seconds, self._start = 0, 0.0, 0.0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.calls += 1
        self.seconds += time.perf_counter() - self._start

    def close(self):
        for handle in self._handles:
            handle.remove()


def hf_generate(target, ids, max_new, eos, pad, assistant=None) -> list[int]:
    inputs = torch.tensor([ids], dtype=torch.long)
    out = target.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=sorted(eos),
        pad_token_id=pad,
        assistant_model=assistant,
    )
    return out[0, len(ids) :].tolist()


def run_all(generate, prompts) -> tuple[list[list[int]], float, list]:
    """Outputs of `generate` on every prompt, total seconds, and whatever extra each call returned."""
    outputs, extras, seconds = [], [], 0.0
    for ids in prompts:
        start = time.perf_counter()
        tokens, extra = generate(ids)
        seconds += time.perf_counter() - start
        outputs.append(tokens)
        extras.append(extra)
    return outputs, seconds, extras


def breakdown(generate, prompts, target, draft) -> dict:
    """Untimed-run split of an engine's wall time: target forwards, draft forwards, everything else."""
    clocks = {"target": ForwardClock(target), "draft": ForwardClock(draft)}
    try:
        _, seconds, _ = run_all(generate, prompts)
    finally:
        for clock in clocks.values():
            clock.close()
    row = {"total_s": round(seconds, 3)}
    for name, clock in clocks.items():
        row[f"{name}_forwards"] = clock.calls
        row[f"{name}_forward_s"] = round(clock.seconds, 3)
        row[f"{name}_ms_per_forward"] = round(1000 * clock.seconds / max(clock.calls, 1), 2)
    row["other_s"] = round(seconds - sum(c.seconds for c in clocks.values()), 3)
    return row


def profile(generate, prompts, top: int) -> list[dict]:
    """cProfile of `generate` over the prompts: the `top` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_all(generate, prompts)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({func})"
        rows.append({"function": where, "calls": calls, "tottime_s": own, "cumtime_s": cum})
    rows.sort(key=lambda r: -r["tottime_s"])
    return [{**r, "tottime_s": round(r["tottime_s"], 3), "cumtime_s": round(r["cumtime_s"], 3)} for r in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF folder (target)")
    parser.add_argument("--draft", help="local HF folder of the draft (default: the target's weights, loaded again)")
    parser.add_argument("--per-category", type=int, default=2, help="SpecBench prompts per category (first turn)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch in the MAL stage's path")
    parser.add_argument("--profile", action="store_true", help="add sd2's cProfile even when it is not slower")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from sd2_core.chat import chat_input_ids, model_eos_ids
    from sd2_core.data.prompts import load_prompts
    from sd2_core.mal import PromptItem, measure_mal
    from sd2_core.models import builtin_dir, is_builtin, load_model, load_tokenizer
    from sd2_core.specdec import ModelDrafter, speculative_generate

    target_dir = builtin_dir(args.model) if is_builtin(args.model) else Path(args.model)
    draft_dir = Path(args.draft) if args.draft else target_dir
    tokenizer, target, draft = load_tokenizer(target_dir), load_model(target_dir), load_model(draft_dir)
    if load_tokenizer(draft_dir).get_vocab() != tokenizer.get_vocab():
        raise SystemExit("draft and target have different vocabularies")
    # transformers reads the assistant's schedule from the assistant's own generation config
    draft.generation_config.num_assistant_tokens = args.k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # 0 disables the early stop on low confidence
    eos = model_eos_ids(tokenizer, target)
    pad = tokenizer.pad_token_id
    items = load_prompts("specbench", per_category=args.per_category)
    prompts = [chat_input_ids(tokenizer, [{"role": "user", "content": p.turns[0]}]) for p in items]
    k, max_new = args.k, args.max_new_tokens

    def sd2(ids):
        res = speculative_generate(target, ModelDrafter(draft), ids, k, max_new, eos)
        return res.tokens, res.steps

    engines = {
        "greedy_generate": lambda ids: (hf_generate(target, ids, max_new, eos, pad), None),
        "assisted_generate": lambda ids: (hf_generate(target, ids, max_new, eos, pad, assistant=draft), None),
        "sd2_speculative": sd2,
    }
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    seconds, steps = dict.fromkeys(engines, 0.0), 0
    with torch.inference_mode():
        for generate in engines.values():
            generate(prompts[0])  # warm-up
        for ids in prompts:  # engines interleaved per prompt, so a busy spell of the machine hits all of them
            for name, generate in engines.items():
                start = time.perf_counter()
                tokens, extra = generate(ids)
                seconds[name] += time.perf_counter() - start
                outputs[name].append(tokens)
                steps += extra or 0
        results = {}
        for name in engines:
            tokens = sum(len(o) for o in outputs[name])
            results[name] = {"tokens": tokens, "seconds": round(seconds[name], 3)}
            results[name]["tokens_per_s"] = round(tokens / seconds[name], 2)
            print(name, json.dumps(results[name]), flush=True)
        results["sd2_speculative"].update(steps=steps, mal=round(results["sd2_speculative"]["tokens"] / steps, 4))
        n = len(prompts)

        def same(a: str, b: str) -> str:
            return f"{sum(x == y for x, y in zip(outputs[a], outputs[b], strict=True))}/{n}"

        # The MAL stage's own path: measure_mal decodes `--batch-size` sequences at once (similar lengths
        # together), each with its own acceptance; its lossless check runs against HF's greedy outputs.
        first_turns = [PromptItem(id=p.id, category=p.category, turns=p.turns[:1]) for p in items]
        greedy_ref = {p.id: [o] for p, o in zip(items, outputs["greedy_generate"], strict=True)}
        measured = measure_mal(
            target, draft, tokenizer, first_turns, k, max_new, reference=greedy_ref, batch_size=args.batch_size
        )
        results["sd2_speculative_batched"] = {
            "batch_size": args.batch_size,
            "tokens": measured["tokens"],
            "seconds": round(measured["seconds"], 3),
            "tokens_per_s": round(measured["tokens"] / measured["seconds"], 2),
            "steps": measured["steps"],
            "mal": round(measured["mal"], 4),
            "identical_to_greedy": f"{measured['lossless']['identical']}/{measured['lossless']['total']}",
        }
        print("sd2_speculative_batched", json.dumps(results["sd2_speculative_batched"]), flush=True)
        ratio = results["sd2_speculative"]["tokens_per_s"] / results["assisted_generate"]["tokens_per_s"]
        batched_ratio = (
            results["sd2_speculative_batched"]["tokens_per_s"] / results["assisted_generate"]["tokens_per_s"]
        )
        split = {e: breakdown(engines[e], prompts, target, draft) for e in ("assisted_generate", "sd2_speculative")}
        cprofile = profile(sd2, prompts, 25) if args.profile or ratio < 1 else None
    result = {
        "benchmark": "mal_vs_assisted",
        "target": str(args.model),
        "draft": str(args.draft or args.model),
        "prompts": {"source": "specbench", "per_category": args.per_category, "count": n, "turns": "first"},
        "k": k,
        "max_new_tokens": max_new,
        "engines": results,
        "identical": {
            "sd2_vs_assisted": same("sd2_speculative", "assisted_generate"),
            "sd2_vs_greedy": same("sd2_speculative", "greedy_generate"),
            "assisted_vs_greedy": same("assisted_generate", "greedy_generate"),
        },
        "sd2_over_assisted_tokens_per_s": round(ratio, 3),
        "sd2_batched_over_assisted_tokens_per_s": round(batched_ratio, 3),
        "sd2_over_greedy_tokens_per_s": round(
            results["sd2_speculative"]["tokens_per_s"] / results["greedy_generate"]["tokens_per_s"], 3
        ),
        "target_ratio": 1.5,
        "note": None
        if args.draft
        else "the draft is the target itself: a draft forward costs as much as a target decode step, so neither "
        "speculative engine can beat plain greedy here; the comparison measures the two engines against each other",
        "time_split_untimed_pass": split,
        "sd2_cprofile_top_by_own_time": cprofile,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_avg_1m": os.getloadavg()[0],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sd2_cprofile_top_by_own_time"}, indent=2))


if __name__ == "__main__":
    main()
