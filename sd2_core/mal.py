"""Mean Accepted Length (MAL): tokens appended per verification step of greedy speculative decoding.

MAL is pooled: sum of appended tokens / sum of verification steps over every prompt and turn (not the mean of
per-prompt MALs, which would over-weight short answers). Multi-turn prompts continue with the TARGET's greedy
answer as the assistant's earlier turns, so every draft is measured on exactly the same contexts; the same
reference outputs check that speculative decoding was lossless, token for token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sd2_core.errors import UserError
from sd2_core.specdec import greedy_generate, speculative_generate

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Reference = dict[str, list[list[int]]]


@dataclass
class PromptItem:
    """One MAL prompt: a SpecBench question (one turn, or two for MT-Bench) and its category."""

    id: str
    category: str
    turns: list[str]


def eos_ids(tokenizer, model) -> set[int]:
    """Tokens that end a turn: the tokenizer's EOS and the model's generation-config EOS (an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return ids


def chat_input_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the chat template, ending with the assistant's header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_inputs(tokenizer, prompts: list[PromptItem], max_new_tokens: int) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; MAL prompts are rendered with it")
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


def greedy_reference(
    target, tokenizer, prompts: list[PromptItem], max_new_tokens: int, progress: Progress | None = None
) -> Reference:
    """The target's greedy output per prompt id per turn (new tokens, EOS included when produced)."""
    _check_inputs(tokenizer, prompts, max_new_tokens)
    eos = eos_ids(tokenizer, target)
    total = sum(len(p.turns) for p in prompts)
    done = 0
    reference: Reference = {}
    for item in prompts:
        answers: list[list[int]] = []
        for turn in range(len(item.turns)):
            ids = _turn_context(tokenizer, item, turn, answers, eos)
            answers.append(greedy_generate(target, ids, max_new_tokens, eos))
            done += 1
            if progress is not None:
                progress(done, total, f"greedy reference {item.id} turn {turn + 1}")
        reference[item.id] = answers
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
        reference = greedy_reference(target, tokenizer, prompts, max_new_tokens, progress=progress)
    for item in prompts:
        if item.id not in reference or len(reference[item.id]) != len(item.turns):
            found = len(reference.get(item.id, [])) if item.id in reference else "none"
            raise UserError(
                f"the greedy reference lacks prompt {item.id!r} ({len(item.turns)} turns needed, found {found}); "
                "recompute it for these prompts"
            )
    eos = eos_ids(tokenizer, target)
    total = sum(len(p.turns) for p in prompts)
    per_prompt: list[dict] = []
    histogram = [0] * (k + 1)
    by_category: dict[str, list[int]] = {}
    seconds = 0.0
    for item in prompts:
        for turn in range(len(item.turns)):
            ids = _turn_context(tokenizer, item, turn, reference[item.id], eos)
            start = time.perf_counter()
            res = speculative_generate(target, draft, ids, k, max_new_tokens, eos)
            seconds += time.perf_counter() - start
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
            if progress is not None:
                progress(len(per_prompt), total, f"speculative {item.id} turn {turn + 1}")
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
