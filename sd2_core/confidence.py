"""Confidence intervals, so that a small grid says which of its differences are real.

MAL is pooled (tokens / verification steps over every sequence), so the bootstrap resamples PROMPTS (a two-turn
MT-Bench prompt is one unit: its turns share a context) with replacement and recomputes the pooled ratio. The
SD² − one-shot difference is paired: both drafts answer the same prompts, so one resample of prompt ids is
applied to both, which removes the between-prompt variance the two share. Percentile intervals, seeded, so a
rerun gives the same interval. Accuracy differences use lm-eval's standard errors (normal approximation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sd2_core.errors import UserError

Counts = dict[str, tuple[int, int]]  # prompt id -> (tokens appended, verification steps), turns summed
Z95 = 1.959963984540054


def prompt_counts(per_prompt: list[dict[str, Any]]) -> Counts:
    """(tokens, steps) per prompt id from a MAL result's per-sequence records (turns of one prompt summed)."""
    counts: dict[str, list[int]] = {}
    for row in per_prompt:
        c = counts.setdefault(str(row["id"]), [0, 0])
        c[0] += int(row["tokens"])
        c[1] += int(row["steps"])
    return {k: (t, s) for k, (t, s) in counts.items()}


def _arrays(counts: Counts, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([counts[i][0] for i in ids], float), np.array([counts[i][1] for i in ids], float)


def _resamples(n: int, iterations: int, seed: int) -> np.ndarray:
    if iterations < 1:
        raise UserError(f"bootstrap iterations must be at least 1, got {iterations}")
    return np.random.default_rng(seed).integers(0, n, size=(iterations, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mal_interval(counts: Counts, iterations: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The pooled MAL and its percentile bootstrap interval over prompts."""
    if not counts:
        raise UserError("no prompts to bootstrap over")
    ids = sorted(counts)
    tokens, steps = _arrays(counts, ids)
    draws = _resamples(len(ids), iterations, seed)
    values = tokens[draws].sum(1) / np.maximum(steps[draws].sum(1), 1)
    lo, hi = _interval(values, level)
    return {"mal": float(tokens.sum() / steps.sum()), "lo": lo, "hi": hi, "level": level, "prompts": len(ids)}


def paired_mal_difference(
    after: Counts, before: Counts, iterations: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """MAL(after) − MAL(before) on the same prompts, with a paired bootstrap interval; significant when the
    interval excludes 0."""
    if set(after) != set(before):
        raise UserError(
            f"a paired comparison needs the same prompts on both sides; only one side has "
            f"{sorted(set(after) ^ set(before))[:5]}"
        )
    ids = sorted(after)
    ta, sa = _arrays(after, ids)
    tb, sb = _arrays(before, ids)
    draws = _resamples(len(ids), iterations, seed)
    diff = ta[draws].sum(1) / np.maximum(sa[draws].sum(1), 1) - tb[draws].sum(1) / np.maximum(sb[draws].sum(1), 1)
    lo, hi = _interval(diff, level)
    return {
        "difference": float(ta.sum() / sa.sum() - tb.sum() / sb.sum()),
        "lo": lo,
        "hi": hi,
        "level": level,
        "significant": bool(lo > 0 or hi < 0),
        "prompts": len(ids),
    }


def accuracy_difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Difference of two accuracies with a 95 % normal interval from their standard errors (independent
    approximation: it ignores that both were scored on the same items, so it is conservative)."""
    diff = after["value"] - before["value"]
    if after.get("stderr") is None or before.get("stderr") is None:
        return {"difference": diff, "lo": None, "hi": None, "significant": None}
    half = Z95 * math.sqrt(after["stderr"] ** 2 + before["stderr"] ** 2)
    return {"difference": diff, "lo": diff - half, "hi": diff + half, "significant": bool(abs(diff) > half)}
