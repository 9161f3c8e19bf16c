"""Mean Accepted Length (MAL): tokens appended per verification step of greedy speculative decoding.

MAL is pooled: sum of appended tokens / sum of verification steps over every prompt and turn (not the mean of
per-prompt MALs, which would over-weight short answers). Multi-turn prompts continue with the TARGET's greedy
answer as the assistant's earlier turns, so every draft is measured on exactly the same contexts; the same
reference outputs check that speculative decoding was lossless, token for token.

`reference_recipe` (the target's greedy outputs, once per target) and `mal_recipe` (one draft) are the stages.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd2_core.artifacts import Progress, Recipe, data_identity, write_json
from sd2_core.chat import chat_input_ids, model_eos_ids
from sd2_core.config import MalConfig
from sd2_core.errors import UserError
from sd2_core.placement import Placement, placement_of
from sd2_core.specdec import ModelDrafter, SpecResult, greedy_generate_batch, speculative_generate_batch
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)
Reference = dict[str, list[list[int]]]


@dataclass
class PromptItem:
    """One MAL prompt: a SpecBench question (one turn, or two for MT-Bench) and its category."""

    id: str
    category: str
    turns: list[str]


def _check_inputs(tokenizer, prompts: list[PromptItem], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        raise UserError("no prompts given; MAL needs at least one")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise UserError(f"prompt ids must be unique, got duplicates {sorted({i for i in ids if ids.count(i) > 1})}")
    for p in prompts:
        if not p.turns:
            raise UserError(f"prompt {p.id!r} has no turns")


def _turn_context(tokenizer, item: PromptItem, turn: int, answers: list[list[int]], eos: set[int]) -> list[int]:
    """Input ids of turn `turn`, its earlier turns answered by the reference (decoded, EOS and specials dropped).

    The one place contexts are rendered, so the reference and every measured draft see identical prompts.
    """
    messages: list[dict[str, str]] = []
    for earlier in range(turn):
        answer = tokenizer.decode([t for t in answers[earlier] if t not in eos], skip_special_tokens=True)
        messages.append({"role": "user", "content": item.turns[earlier]})
        messages.append({"role": "assistant", "content": answer.strip()})
    messages.append({"role": "user", "content": item.turns[turn]})
    return chat_input_ids(tokenizer, messages)


def _length_batches(contexts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indexes of `contexts` in batches of at most `batch_size`, similar lengths together (less padding)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def greedy_reference(
    target,
    tokenizer,
    prompts: list[PromptItem],
    max_new_tokens: int,
    progress: Progress | None = None,
    batch_size: int = 1,
) -> Reference:
    """The target's greedy output per prompt id per turn (new tokens, EOS included when produced).

    Turn t of every prompt is decoded before turn t+1, whose context holds the answers to the earlier turns.
    """
    _check_inputs(tokenizer, prompts, max_new_tokens)
    eos = model_eos_ids(tokenizer, target)
    total = sum(len(p.turns) for p in prompts)
    done = 0
    reference: Reference = {item.id: [] for item in prompts}
    for turn in range(max(len(p.turns) for p in prompts)):
        items = [item for item in prompts if len(item.turns) > turn]
        contexts = [_turn_context(tokenizer, item, turn, reference[item.id], eos) for item in items]
        for batch in _length_batches(contexts, batch_size):
            outputs = greedy_generate_batch(target, [contexts[i] for i in batch], max_new_tokens, eos)
            for i, output in zip(batch, outputs, strict=True):
                reference[items[i].id].append(output)
            done += len(batch)
            if progress is not None:
                progress(done, total, f"greedy reference, turn {turn + 1}, {len(batch)} sequences")
    return reference


def _ratio(tokens: int, steps: int) -> float:
    return tokens / steps if steps else 0.0


def measure_mal(
    target,
    draft,
    tokenizer,
    prompts: list[PromptItem],
    k: int,
    max_new_tokens: int,
    reference: Reference | None = None,
    progress: Progress | None = None,
    batch_size: int = 1,
) -> dict:
    """MAL of `draft` for `target` over the prompts, overall and per category, with a lossless check.

    `reference` (from greedy_reference, e.g. cached once per target) supplies the multi-turn contexts and the
    sequences speculative decoding must reproduce; computed here when None. `seconds` times the speculative
    decoding alone.
    """
    _check_inputs(tokenizer, prompts, max_new_tokens)
    if k < 1:
        raise UserError(f"k (draft tokens per step) must be at least 1, got {k}")
    if reference is None:
        reference = greedy_reference(target, tokenizer, prompts, max_new_tokens, progress, batch_size)
    for item in prompts:
        if item.id not in reference or len(reference[item.id]) != len(item.turns):
            found = len(reference.get(item.id, [])) if item.id in reference else "none"
            raise UserError(
                f"the greedy reference lacks prompt {item.id!r} ({len(item.turns)} turns needed, found {found}); "
                "recompute it for these prompts"
            )
    eos = model_eos_ids(tokenizer, target)
    sequences = [(item, turn) for item in prompts for turn in range(len(item.turns))]
    contexts = [_turn_context(tokenizer, item, turn, reference[item.id], eos) for item, turn in sequences]
    outcomes: list[SpecResult | None] = [None] * len(sequences)
    seconds = 0.0
    done = 0
    for batch in _length_batches(contexts, batch_size):
        start = time.perf_counter()
        results = speculative_generate_batch(
            target, ModelDrafter(draft), [contexts[i] for i in batch], k, max_new_tokens, eos
        )
        seconds += time.perf_counter() - start
        for i, res in zip(batch, results, strict=True):
            outcomes[i] = res
        done += len(batch)
        if progress is not None:
            progress(done, len(sequences), f"speculative decoding, {len(batch)} sequences")
    per_prompt: list[dict] = []
    histogram = [0] * (k + 1)
    by_category: dict[str, list[int]] = {}
    for (item, turn), res in zip(sequences, outcomes, strict=True):
        assert res is not None
        identical = res.tokens == list(reference[item.id][turn])
        if not identical:
            log.info("prompt %s turn %d: speculative output differs from greedy", item.id, turn + 1)
        for accepted in res.accepted_per_step:
            histogram[accepted] += 1
        totals = by_category.setdefault(item.category, [0, 0])
        totals[0] += len(res.tokens)
        totals[1] += res.steps
        per_prompt.append(
            {
                "id": item.id,
                "category": item.category,
                "turn": turn + 1,
                "steps": res.steps,
                "tokens": len(res.tokens),
                "identical": identical,
            }
        )
    tokens = sum(r["tokens"] for r in per_prompt)
    steps = sum(r["steps"] for r in per_prompt)
    result = {
        "mal": _ratio(tokens, steps),
        "mal_per_category": {cat: _ratio(t, s) for cat, (t, s) in by_category.items()},
        "steps": steps,
        "tokens": tokens,
        "lossless": {"identical": sum(r["identical"] for r in per_prompt), "total": len(per_prompt)},
        "acceptance_histogram": histogram,
        "per_prompt": per_prompt,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }
    log.info(
        "MAL %.3f over %d sequences (k=%d), %d/%d identical to greedy",
        result["mal"],
        len(per_prompt),
        k,
        result["lossless"]["identical"],
        len(per_prompt),
    )
    return result


def _prompts(cfg: MalConfig) -> list[PromptItem]:
    from sd2_core.data.prompts import load_prompts

    return load_prompts(cfg.prompts, per_category=cfg.per_category)


def _load_target(store: Store, target: ArtifactRef, placement: Placement):
    """The target on the placement's device; on CUDA spread over every visible GPU if one is not enough
    (the draft goes to the placement's device, the first GPU)."""
    from sd2_core.models import load_artifact

    return load_artifact(store, target, placement.dtype, placement.device, split=placement.device.type == "cuda")


def reference_recipe(store: Store, target: ArtifactRef, cfg: MalConfig) -> Recipe:
    """The `reference` stage: the target's own greedy outputs, shared by every MAL measurement against it."""
    placement = placement_of(cfg)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        prompts = _prompts(cfg)
        model, tokenizer = _load_target(store, target, placement)
        start = time.time()
        reference = greedy_reference(model, tokenizer, prompts, cfg.max_new_tokens, progress, cfg.batch_size)
        tokens = sum(len(t) for turns in reference.values() for t in turns)
        (out / "reference.json").write_text(json.dumps(reference))
        seconds = time.time() - start
        return {"prompts": len(prompts), "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}

    config = {
        "prompts": cfg.prompts,
        "per_category": cfg.per_category,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "placement": placement.identity,
        **data_identity(cfg.prompts),
    }
    return Recipe("reference", config, (target,), build, code=__name__)


def mal_recipe(store: Store, target: ArtifactRef, draft: ArtifactRef, ref: ArtifactRef, cfg: MalConfig) -> Recipe:
    """The `mal` stage: MAL of the draft against the target, lossless check, MACs per token and improvement factor."""
    from sd2_core.chat import mean_prompt_len
    from sd2_core.confidence import mal_interval, prompt_counts
    from sd2_core.macs import cost_ratio, improvement_factor
    from sd2_core.models import load_artifact

    placement = placement_of(cfg)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        prompts = _prompts(cfg)
        reference = json.loads(store.read_text(ref, "reference.json"))
        target_model, tokenizer = _load_target(store, target, placement)
        draft_model, draft_tokenizer = load_artifact(store, draft, placement.dtype, placement.device)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"draft {draft.summary.get('ref', draft.uri)} and target {target.summary.get('ref', target.uri)} "
                "have different vocabularies; token-level speculative decoding needs a draft with the target's "
                "tokenizer (cross-tokenizer drafting is not supported)"
            )
        result = measure_mal(
            target_model,
            draft_model,
            tokenizer,
            prompts,
            cfg.k,
            cfg.max_new_tokens,
            reference,
            progress,
            batch_size=cfg.batch_size,
        )
        prompt_len = mean_prompt_len(tokenizer, [p.turns[0] for p in prompts])
        cost = cost_ratio(draft_model, target_model, prompt_len, cfg.max_new_tokens)
        result["macs_per_token"] = {"draft": cost["draft"], "target": cost["target"], "context_len_mean": prompt_len}
        result["c"] = cost["c"]
        result["improvement_factor_theoretical"] = improvement_factor(result["mal"], cfg.k, cost["c"])
        counts = prompt_counts(result["per_prompt"])
        result["mal_ci"] = mal_interval(counts)
        write_json(out / "mal.json", result)
        return {
            "mal": result["mal"],
            "mal_ci": result["mal_ci"],
            "prompt_counts": counts,  # what a paired comparison of two drafts resamples
            "mal_per_category": result["mal_per_category"],
            "lossless": result["lossless"],
            "macs_per_token": {"draft": cost["draft"]["total"], "target": cost["target"]["total"]},
            "c": cost["c"],
            "improvement_factor_theoretical": result["improvement_factor_theoretical"],
            "k": cfg.k,
            "steps": result["steps"],
            "tokens": result["tokens"],
        }

    config = {
        **cfg.model_dump(mode="json", exclude={"device", "dtype"}),
        "placement": placement.identity,
        **data_identity(cfg.prompts),
    }
    return Recipe("mal", config, (target, draft, ref), build, code=__name__)
