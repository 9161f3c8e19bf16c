"""The fine-tuning mix: rows drawn from each distilled source in the paper's proportions (75/12.5/12.5 by default).

WHY here and not in fine-tuning: which rows a draft sees is a data decision, made once and seeded, and the
trainer should receive a plain list of chat rows whatever the mix.
"""

from __future__ import annotations

import logging
import math
import random

from sd2_core.errors import UserError

log = logging.getLogger(__name__)


def mix_examples(sources: dict[str, list[dict]], weights: dict[str, float], total: int, seed: int) -> list[dict]:
    """``total`` rows drawn from the sources in proportion to ``weights`` (deterministic by seed).

    Each source's share is rounded by largest remainder so the counts add up to ``total``. A source
    asked for more rows than it holds is cycled through fresh shuffles (every row used evenly), i.e.
    sampled with replacement; otherwise rows are drawn without replacement. Sources without a
    weight are not used.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise UserError(f"total must be a positive integer, got {total!r}")
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0}
    if bad:
        raise UserError(f"mix weights must be finite and non-negative, got {bad}")
    missing = sorted(k for k, w in weights.items() if w > 0 and k not in sources)
    if missing:
        raise UserError(f"mix weights name sources that are missing: {missing}; available sources: {sorted(sources)}")
    empty = sorted(k for k, w in weights.items() if w > 0 and not sources[k])
    if empty:
        raise UserError(f"mix weights ask for rows from empty sources: {empty}")
    used = sorted(k for k, w in weights.items() if w > 0)
    if not used:
        raise UserError(f"mix weights are all zero: {weights}; give at least one source a positive weight")
    unweighted = sorted(set(sources) - set(weights))
    if unweighted:
        log.info("sources without a mix weight are not used: %s", unweighted)

    norm = sum(weights[k] for k in used)
    exact = {k: total * weights[k] / norm for k in used}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(used, key=lambda k: (-(exact[k] - counts[k]), k))[: total - sum(counts.values())]:
        counts[k] += 1

    rng = random.Random(seed)
    out: list[dict] = []
    for name in used:
        rows = sources[name]
        picked: list[dict] = []
        while len(picked) < counts[name]:
            order = list(range(len(rows)))
            rng.shuffle(order)
            picked.extend(rows[i] for i in order[: counts[name] - len(picked)])
        out.extend(picked)
    rng.shuffle(out)
    return out
