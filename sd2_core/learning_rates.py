"""Default fine-tuning learning rate of a draft: the SD² paper's own table, by draft size and kind of sparsity.

WHY: the paper tunes the learning rate per draft model and sparsity, so a cell that leaves
``FinetuneConfig.learning_rate`` unset gets the rate the paper used for the nearest draft it fine-tuned.
Source: Lasby et al., 2025, "Self-Distilled Sparse Drafters", arXiv 2504.08838, Appendix A (AdamW with
β = 0.9/0.999 and ε = 1e-8, linear schedule, 5 % warm-up):

| draft | 50 % | 2:4 | 50 % layer-pruned | 66 % | 75 % |
| --- | --- | --- | --- | --- | --- |
| Llama-3.2-1B-Instruct | 1.25e-5 | 1.25e-5 | 1.25e-5 | 2.0e-5 | 5.0e-5 |
| Llama-3.2-3B-Instruct | 7.5e-6 | 7.5e-6 | 7.5e-6 | 1.25e-5 | 2.0e-5 |
| Qwen-2.5-0.5B / 1.5B-Instruct | 1.25e-5 | 1.25e-5 | 1.25e-5 | – | – |
| Qwen-2.5-3B-Instruct | 7.5e-6 | 7.5e-6 | 7.5e-6 | – | – |

Beyond the paper's own drafts, its rule "smaller and sparser drafts need higher rates" decides:

- row: a draft of exactly a paper draft's parameter count uses that draft's row where it has the column;
  any other size uses the Llama row (they have every column) of the nearest size ≥ the draft's, so
  anything up to Llama-3.2-1B's 1.24 B uses the 1B row, up to 3.21 B the 3B row, and larger drafts the
  3B row. (So a 1.5 B draft that is not Qwen-2.5-1.5B gets the 3B row's 7.5e-6 at 50 %, where the
  paper's Qwen-2.5-1.5B used 1.25e-5: the rule follows the Llama rows, the exact Qwen drafts their own.)
- column: the kind of sparsity. Unstructured: the nearest of 50 %, 66 %, 75 %. N:M: the 2:4 column (the
  paper's only N:M pattern). Layer pruning: the 50 % layer-pruned column (the paper's only layer fraction).
  Dense: the paper fine-tunes no dense draft; the 50 % column stands in, and the choice says so.

`learning_rate_choice` returns the rate with the row, column and reason, for the finetune manifest.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

from sd2_core.errors import UserError

SparsityKind = Literal["dense", "unstructured", "nm", "layer"]
KINDS: tuple[str, ...] = get_args(SparsityKind)
SOURCE = "SD² Appendix A"

# Columns of the paper's table, in its order; unstructured ones with the sparsity they stand for.
COLUMNS: tuple[str, ...] = ("50 %", "2:4", "50 % layer-pruned", "66 %", "75 %")
UNSTRUCTURED_COLUMNS: dict[str, float] = {"50 %": 0.5, "66 %": 2 / 3, "75 %": 0.75}


class PaperRow(NamedTuple):
    """One draft of the paper: its name, parameter count (tied embeddings once) and rate per column it ran."""

    name: str
    num_params: int
    rates: dict[str, float]


_SMALL = {"50 %": 1.25e-5, "2:4": 1.25e-5, "50 % layer-pruned": 1.25e-5}
_LARGE = {"50 %": 7.5e-6, "2:4": 7.5e-6, "50 % layer-pruned": 7.5e-6}
LLAMA_ROWS: tuple[PaperRow, ...] = (
    PaperRow("Llama-3.2-1B-Instruct", 1_235_814_400, {**_SMALL, "66 %": 2.0e-5, "75 %": 5.0e-5}),
    PaperRow("Llama-3.2-3B-Instruct", 3_212_749_824, {**_LARGE, "66 %": 1.25e-5, "75 %": 2.0e-5}),
)
QWEN_ROWS: tuple[PaperRow, ...] = (
    PaperRow("Qwen-2.5-0.5B-Instruct", 494_032_768, dict(_SMALL)),
    PaperRow("Qwen-2.5-1.5B-Instruct", 1_543_714_304, dict(_SMALL)),
    PaperRow("Qwen-2.5-3B-Instruct", 3_085_938_688, dict(_LARGE)),
)


class LearningRateChoice(NamedTuple):
    """The rate and where in the table it came from: ``lr, row, column, note = learning_rate_choice(...)``."""

    lr: float
    row: str
    column: str
    note: str

    @property
    def source(self) -> str:
        """One line for the manifest, e.g. 'SD² Appendix A, row Llama-3.2-1B-Instruct (nearest size ≥ 135M), ...'."""
        return f"{SOURCE}, {self.note}"


def _size(num_params: int) -> str:
    """135M, 1.24B: a parameter count as people write it."""
    return f"{num_params / 1e9:.3g}B" if num_params >= 1e9 else f"{num_params / 1e6:.3g}M"


def _check(num_params: object, sparsity: object, kind: object) -> None:
    """Refuse what the table cannot answer, naming the value and what is valid."""
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params <= 0:
        raise UserError(f"num_params must be a positive integer (the draft's parameter count), got {num_params!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise UserError(f"sparsity must be a fraction in [0, 1) (0 = dense, 2:4 = 0.5), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be a fraction in [0, 1) (0 = dense, 2:4 = 0.5), got {sparsity!r}")
    if kind not in KINDS:
        raise UserError(f"unknown kind of sparsity {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "dense" and sparsity != 0:
        raise UserError(f"a dense draft has sparsity 0, got {sparsity!r}; a pruned one is kind {', '.join(KINDS[1:])}")
    if kind != "dense" and sparsity == 0:
        raise UserError(f"kind {kind!r} needs a sparsity in (0, 1), got 0; a draft without pruning is kind 'dense'")


def _column(sparsity: float, kind: str) -> tuple[str, str]:
    """The table column for this kind and sparsity, and a note when it is not an exact match."""
    percent = f"{sparsity * 100:.3g} %"
    if kind == "dense":
        return "50 %", "the paper fine-tunes no dense draft: its 50 % column stands in"
    if kind == "nm":
        return "2:4", "" if math.isclose(sparsity, 0.5) else f"N:M at {percent}: the paper's only N:M column is 2:4"
    if kind == "layer":
        exact = math.isclose(sparsity, 0.5)
        return "50 % layer-pruned", "" if exact else f"layer pruning at {percent}: the paper layer-prunes only 50 %"
    column = min(UNSTRUCTURED_COLUMNS, key=lambda c: abs(UNSTRUCTURED_COLUMNS[c] - sparsity))
    exact = abs(UNSTRUCTURED_COLUMNS[column] - sparsity) < 0.01  # 0.66 is the paper's 66 %
    return column, "" if exact else f"nearest column to {percent}"


def _row(num_params: int, column: str) -> tuple[PaperRow, str]:
    """The row for this size: a paper draft's own where the size is exactly one's, else the Llama size rule."""
    missing = ""
    for row in (*LLAMA_ROWS, *QWEN_ROWS):
        if row.num_params == num_params:
            if column in row.rates:
                return row, "the paper's own draft"
            missing = f"the paper has no {column} {row.name}; "
    for row in LLAMA_ROWS:
        if row.num_params >= num_params:
            return row, f"{missing}nearest size ≥ {_size(num_params)}"
    return LLAMA_ROWS[-1], f"{missing}{_size(num_params)} is above the largest paper draft"


def learning_rate_choice(num_params: int, sparsity: float, kind: str | None = None) -> LearningRateChoice:
    """The paper's rate for a draft of ``num_params`` parameters pruned to ``sparsity`` of the given ``kind``.

    ``kind`` is one of `KINDS`; None means dense at sparsity 0, else unstructured. For a layer-pruned draft
    ``num_params`` is the draft's size before its blocks were dropped (the paper's rows are the base models).
    """
    if kind is None:
        kind = "dense" if sparsity == 0 else "unstructured"
    _check(num_params, sparsity, kind)
    column, column_note = _column(float(sparsity), kind)
    row, row_note = _row(num_params, column)
    note = f"row {row.name} ({row_note}), column {column}" + (f" ({column_note})" if column_note else "")
    return LearningRateChoice(row.rates[column], row.name, column, note)


def default_learning_rate(num_params: int, sparsity: float, kind: str | None = None) -> float:
    """The rate alone of `learning_rate_choice`."""
    return learning_rate_choice(num_params, sparsity, kind).lr
