"""Default fine-tuning learning rate by draft size and sparsity: the project's defaults, not the paper's.

WHY: the paper tunes the learning rate per draft model and sparsity (Appendix A of "SD²:
Self-Distilled Sparse Drafters", Lasby et al., 2025, arXiv 2504.08838), so a cell that leaves
``FinetuneConfig.learning_rate`` unset should get a size- and sparsity-appropriate value.

PROVENANCE — THESE ARE NOT THE PAPER'S VALUES. The appendix table could not be retrieved here
(only the paper's abstract and introduction were reachable through the stored copies searched),
so the numbers below are this project's own choices, following common practice for full
fine-tuning of 0.5B-3B chat models (about 1e-5 to 5e-5 when dense) and the usual observation that
smaller models and higher sparsity tolerate, and need, a larger step to recover. Replace
``_TABLE`` with the paper's Appendix A values when they are at hand; nothing else has to change.

Rows are anchored at the parameter counts of the paper's drafts (Qwen-2.5-0.5B, Llama-3.2-1B,
Qwen-2.5-1.5B, Llama-3.2-3B / Qwen-2.5-3B); a model maps to the nearest row in log-size, so
smaller models (e.g. SmolLM2-135M) use the smallest row and larger ones the largest. Columns are
sparsities; a sparsity maps to the nearest column (0 = dense, 2:4 counts as 0.5).
"""

from __future__ import annotations

import math

from sd2_core.errors import UserError

SPARSITY_COLUMNS: tuple[float, ...] = (0.0, 0.5, 2 / 3, 0.75)

# (row anchor in parameters, learning rate per SPARSITY_COLUMNS entry) — project defaults, NOT the paper's.
_TABLE: tuple[tuple[int, tuple[float, ...]], ...] = (
    (494_000_000, (5e-5, 1e-4, 1.5e-4, 2e-4)),  # ~Qwen-2.5-0.5B
    (1_236_000_000, (3e-5, 6e-5, 9e-5, 1.2e-4)),  # ~Llama-3.2-1B
    (1_544_000_000, (2e-5, 5e-5, 7e-5, 1e-4)),  # ~Qwen-2.5-1.5B
    (3_100_000_000, (1e-5, 3e-5, 4e-5, 5e-5)),  # ~Llama-3.2-3B / Qwen-2.5-3B
)

TABLE_SOURCE = "project defaults (the SD² Appendix A table was not available); see sd2_core/learning_rates.py"


def default_learning_rate(num_params: int, sparsity: float) -> float:
    """Learning rate for a draft of ``num_params`` parameters pruned to ``sparsity`` (0 = dense)."""
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params <= 0:
        raise UserError(f"num_params must be a positive integer, got {num_params!r}")
    if not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be a fraction in [0, 1) (0 = dense, 2:4 = 0.5), got {sparsity!r}")
    size = math.log(num_params)
    _, rates = min(_TABLE, key=lambda row: abs(math.log(row[0]) - size))
    column = min(range(len(SPARSITY_COLUMNS)), key=lambda i: abs(SPARSITY_COLUMNS[i] - sparsity))
    return rates[column]
