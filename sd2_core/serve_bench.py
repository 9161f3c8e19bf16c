"""The drafter as users deploy it: vLLM serving the target alone, then with the draft as its speculative model.

Why: MAL and the theoretical improvement factor say what a draft could do; what a user gets is the speed of the
engine they serve with. Both runs answer the same SpecBench turns, one request at a time (the latency-bound
regime speculative decoding is for), greedily (vLLM's speculative decoding is exact only at temperature 0).
Later turns of a conversation are built from the target-alone answers, as the MAL stage builds them from the
greedy reference, so both runs see identical contexts and every served output can be compared token for token.
vLLM's own counters (drafts, accepted tokens) give its MAL: accepted per draft + 1.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from sd2_core.artifacts import Progress, Recipe
from sd2_core.config import MalConfig, ServeConfig
from sd2_core.errors import UserError
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)

MAX_K = 16
MAL_WARN_GAP = 0.1  # vLLM's MAL and sd2's for the same pair differing by more than this gets a warning


def check_pair(target_dir: Path, draft_dir: Path, k: int) -> None:
    """Refuse, before any weights load, a pair vLLM cannot serve as target + draft: k outside 1..16, another
    vocabulary, or a draft with more parameters than its target."""
    from sd2_core.models import load_tokenizer, stored_parameters

    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise UserError(f"k (draft tokens per step) must be an integer in 1..{MAX_K}, got {k!r}")
    if load_tokenizer(target_dir).get_vocab() != load_tokenizer(draft_dir).get_vocab():
        raise UserError(
            f"draft {draft_dir} and target {target_dir} have different vocabularies; vLLM's draft-model speculative "
            "decoding needs a draft with the target's tokenizer"
        )
    target_params, draft_params = stored_parameters(target_dir), stored_parameters(draft_dir)
    if draft_params > target_params:
        raise UserError(
            f"the draft {draft_dir} has {draft_params:,} parameters, more than its target {target_dir} "
            f"({target_params:,}); a draft must not be larger than the model it drafts for"
        )


def serving_enabled(serve: ServeConfig) -> bool:
    """Whether a cell runs the served benchmark: 'on' requires vLLM (a UserError says how to install it), 'auto'
    runs it where vLLM is installed, 'off' never."""
    from sd2_core.vllm_server import find_vllm, require_vllm

    if serve.enabled == "off":
        return False
    if serve.enabled == "on":
        require_vllm()
        return True
    return find_vllm() is not None


def _eos(folder: Path, tokenizer) -> list[int]:
    from transformers import GenerationConfig

    from sd2_core.chat import eos_ids

    return eos_ids(tokenizer, GenerationConfig.from_pretrained(folder))


def serve_turns(server, tokenizer, prompts, max_new_tokens: int, eos: list[int], answers_from=None) -> dict:
    """Every turn of every prompt, one request at a time: token ids per prompt and turn, seconds per request.

    Turn t's context holds the earlier turns answered by `answers_from` (the target-alone run) or, when None,
    by this run's own answers."""
    from sd2_core.mal import _turn_context

    eos_set = set(eos)
    answers: dict[str, list[list[int]]] = {item.id: [] for item in prompts}
    requests: list[dict[str, Any]] = []
    for turn in range(max(len(item.turns) for item in prompts)):
        for item in prompts:
            if turn >= len(item.turns):
                continue
            earlier = (answers_from or answers)[item.id]
            context = _turn_context(tokenizer, item, turn, earlier, eos_set)
            body = {
                "prompt": context,
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "stop_token_ids": eos,
                "return_token_ids": True,
            }
            start = time.perf_counter()
            choice = server.complete([body])[0]
            seconds = time.perf_counter() - start
            tokens = list(choice.get("token_ids") or [])
            answers[item.id].append(tokens)
            requests.append({"id": item.id, "turn": turn + 1, "tokens": len(tokens), "seconds": round(seconds, 4)})
    return {"answers": answers, "requests": requests}


def throughput(requests: list[dict[str, Any]]) -> dict[str, float]:
    tokens = sum(r["tokens"] for r in requests)
    seconds = sum(r["seconds"] for r in requests)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "median_latency_s": statistics.median(r["seconds"] for r in requests) if requests else 0.0,
    }


def _server_settings(cfg: MalConfig) -> dict[str, Any]:
    """The same settings as a default distillation's server (sd2_core.distill.vllm_settings): the pooled server
    that distilled is reused for the target-alone run."""
    from sd2_core.placement import placement_of

    return {"dtype": placement_of(cfg).dtype_name, "seed": 0, "tensor_parallel_size": 1}


def _prompts(cfg: MalConfig):
    from sd2_core.data.prompts import load_prompts

    return load_prompts(cfg.prompts, per_category=cfg.per_category)


def served_target_recipe(store: Store, target: ArtifactRef, cfg: MalConfig) -> Recipe:
    """The `serve_target` stage: vLLM serving the target alone on the MAL prompts (once per target)."""

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        from sd2_core.models import load_tokenizer
        from sd2_core.vllm_server import shared_server

        folder = store.local_dir(target)
        tokenizer = load_tokenizer(folder)
        prompts = _prompts(cfg)
        with shared_server(folder, **_server_settings(cfg)) as server:
            if progress:
                progress(0, 1, f"serving the target alone ({server.install.label})")
            run = serve_turns(server, tokenizer, prompts, cfg.max_new_tokens, _eos(folder, tokenizer))
            engine = server.install.label
        (out / "served.json").write_text(json.dumps(run))
        return {"engine": engine, **throughput(run["requests"])}

    config = {
        "prompts": cfg.prompts,
        "per_category": cfg.per_category,
        "max_new_tokens": cfg.max_new_tokens,
        "placement": _server_settings(cfg),
    }
    return Recipe("serve_target", config, (target,), build, code=__name__)


def serve_bench_recipe(
    store: Store,
    target: ArtifactRef,
    draft: ArtifactRef,
    alone: ArtifactRef,
    cfg: MalConfig,
    sd2_mal: float | None = None,
) -> Recipe:
    """The `serve` stage: vLLM with the draft as its speculative model against the target-alone run."""

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        from sd2_core.models import load_tokenizer
        from sd2_core.vllm_server import shared_server

        target_dir, draft_dir = store.local_dir(target), store.local_dir(draft)
        check_pair(target_dir, draft_dir, cfg.k)
        tokenizer = load_tokenizer(target_dir)
        prompts = _prompts(cfg)
        before_run = json.loads(store.read_text(alone, "served.json"))
        speculative = {"model": str(draft_dir), "method": "draft_model", "num_speculative_tokens": cfg.k}
        with shared_server(target_dir, speculative=speculative, **_server_settings(cfg)) as server:
            if progress:
                progress(0, 1, f"serving the target with the draft, k={cfg.k} ({server.install.label})")
            counters_before = server.metrics()
            run = serve_turns(
                server, tokenizer, prompts, cfg.max_new_tokens, _eos(target_dir, tokenizer), before_run["answers"]
            )
            counters_after = server.metrics()
            engine = server.install.label
        result = served_figures(before_run, run, counters_before, counters_after, sd2_mal)
        (out / "served.json").write_text(json.dumps({**run, "figures": result}))
        return {"engine": engine, "k": cfg.k, **result}

    config = {"k": cfg.k, "placement": _server_settings(cfg)}
    return Recipe("serve", config, (target, draft, alone), build, code=__name__)


def served_figures(
    alone: dict, with_draft: dict, counters_before: dict[str, float], counters_after: dict[str, float], sd2_mal=None
) -> dict[str, Any]:
    """Speed alone and with the draft, the measured speed-up, vLLM's MAL, and how many outputs are identical."""
    solo, spec = throughput(alone["requests"]), throughput(with_draft["requests"])

    def delta(name: str) -> float:
        return counters_after.get(name, 0.0) - counters_before.get(name, 0.0)

    drafts = delta("vllm:spec_decode_num_drafts_total")
    accepted = delta("vllm:spec_decode_num_accepted_tokens_total")
    vllm_mal = 1.0 + accepted / drafts if drafts > 0 else None
    pairs = [
        (a, b)
        for key in alone["answers"]
        for a, b in zip(alone["answers"][key], with_draft["answers"].get(key, []), strict=False)
    ]
    identical = sum(a == b for a, b in pairs)
    figures: dict[str, Any] = {
        "tokens_per_second_alone": solo["tokens_per_second"],
        "tokens_per_second_with_draft": spec["tokens_per_second"],
        "median_latency_s_alone": solo["median_latency_s"],
        "median_latency_s_with_draft": spec["median_latency_s"],
        "speedup": spec["tokens_per_second"] / solo["tokens_per_second"] if solo["tokens_per_second"] else None,
        "vllm_mal": vllm_mal,
        "vllm_drafts": drafts,
        "vllm_accepted_tokens": accepted,
        "identical": identical,
        "total": len(pairs),
    }
    if sd2_mal is not None:
        figures["sd2_mal"] = sd2_mal
        if vllm_mal is not None and abs(vllm_mal - sd2_mal) > MAL_WARN_GAP:
            log.warning(
                "vLLM's MAL %.3f and sd2's %.3f for the same pair differ by more than %.1f", vllm_mal, sd2_mal,
                MAL_WARN_GAP,
            )  # fmt: skip
    return figures
