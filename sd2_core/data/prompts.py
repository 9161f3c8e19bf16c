"""MAL prompts: the shipped SpecBench questions, or a user's .jsonl of prompts.

SpecBench's file labels its 80 MT-Bench rows with MT-Bench's own eight categories; SpecBench reports
them as one group, so those labels are mapped to "mt_bench" here (6 categories, 80 prompts each).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_core.data import embedded_path, jsonl_values
from sd2_core.errors import UserError

if TYPE_CHECKING:
    from sd2_core.mal import PromptItem

log = logging.getLogger(__name__)

SPECBENCH_FILE = "spec_bench.jsonl"
MT_BENCH_LABELS = frozenset({"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"})
MT_BENCH = "mt_bench"
DEFAULT_CATEGORY = "custom"


def _item(row: Any, number: int, where: str) -> tuple[str | None, str, list[str]]:
    """(question id or None, category, turns) of one row; a malformed row is a UserError naming its line."""
    if not isinstance(row, dict):
        raise UserError(f"{where} line {number}: expected a JSON object, got {type(row).__name__}")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{where} line {number}: 'turns' must be a non-empty list of non-empty strings")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise UserError(f"{where} line {number}: 'prompt' must be a non-empty string")
        turns = [row["prompt"]]
    else:
        raise UserError(
            f'{where} line {number}: row has keys {sorted(row)}; expected {{"prompt": str}} or '
            '{"turns": [str, ...], "category"?: str, "question_id"?: int|str}'
        )
    category = row.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise UserError(f"{where} line {number}: 'category' must be a non-empty string")
    category = MT_BENCH if category in MT_BENCH_LABELS else category
    qid = row.get("question_id")
    return (None if qid is None else str(qid)), category, list(turns)


def load_prompts(source: str = "specbench", per_category: int | None = None) -> list[PromptItem]:
    """Prompts for MAL in file order; per_category keeps only the first N of each category."""
    from sd2_core.mal import PromptItem  # imported here: sd2_core.mal may import this module

    if per_category is not None and per_category < 1:
        raise UserError(f"per_category must be a positive integer or None, got {per_category}")
    if source == "specbench":
        path, where = embedded_path(SPECBENCH_FILE), f"embedded {SPECBENCH_FILE}"
    else:
        path, where = Path(source).expanduser(), source
        if path.suffix.lower() != ".jsonl":
            raise UserError(f"unknown prompt source {source!r}: use 'specbench' or a .jsonl path")
        if not path.exists():
            raise UserError(f"prompt file {path} does not exist")

    items: list[PromptItem] = []
    seen: set[str] = set()
    taken: dict[str, int] = {}
    for number, row in jsonl_values(path.read_text(encoding="utf-8"), where):
        qid, category, turns = _item(row, number, where)
        item_id = qid if qid is not None else str(number)
        if item_id in seen:
            raise UserError(f"{where} line {number}: duplicate question_id {item_id!r}")
        seen.add(item_id)
        if per_category is not None and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        items.append(PromptItem(id=item_id, category=category, turns=turns))
    if not items:
        raise UserError(f"{where} holds no prompts")
    log.info("loaded %d prompts in %d categories from %s", len(items), len(taken), where)
    return items
