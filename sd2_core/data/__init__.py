"""Data for SD²: distillation sources, calibration text and MAL prompts, with small real subsets shipped.

Import the loaders from their modules (`sources`, `calibration`, `prompts`); this package only knows
where the shipped files live, so importing it stays cheap and free of import cycles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd2_core.errors import UserError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


def embedded_path(name: str) -> Path:
    """Path of a shipped data file; a missing one means a broken install, not a user mistake."""
    path = EMBEDDED_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"shipped data file {path} is missing: the sd2 install is incomplete (package data "
            "sd2_core/data/embedded/* not installed); reinstall sd2"
        )
    return path


def jsonl_values(text: str, where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-empty line of a JSON-lines text; a bad line is a UserError."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} line {number} is not valid JSON: {exc.msg}") from None
