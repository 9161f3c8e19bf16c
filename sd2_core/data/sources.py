"""Distillation sources: load instruction/reference rows from the shipped subsets, local files or the HF hub.

Every source ends up as the same small record, `{"id", "kind", "instruction", "reference"}`, so the
distillation stage never cares where the rows came from. The rows are picked by a seeded shuffle of
the whole source, then the first `limit` usable rows, so a bigger limit extends a smaller one.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd2_core.config import SourceSpec
from sd2_core.data import embedded_path, jsonl_values
from sd2_core.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_FILES = {
    "general": "instruct_subset.jsonl",
    "translation": "translation_subset.jsonl",
    "math": "gsm8k_train_subset.jsonl",
}
INSTRUCTION_KEYS = ("instruction", "prompt", "question")
REFERENCE_KEYS = ("reference", "output", "answer", "response")
CHAT_KEYS = ("messages", "conversations")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "cs": "Czech", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "tr": "Turkish", "hi": "Hindi", "sv": "Swedish",
    "fi": "Finnish", "ro": "Romanian", "hu": "Hungarian", "el": "Greek", "da": "Danish", "no": "Norwegian",
}  # fmt: skip

ACCEPTED_SCHEMAS = (
    f"one of {list(INSTRUCTION_KEYS)} with one of {list(REFERENCE_KEYS)} (optional 'input' appended to the "
    "instruction); or 'source' + 'target' (translation pairs, optional 'source_lang'/'target_lang'); or "
    "'translation' as a {lang: text} dict; or a chat list in 'messages'/'conversations'"
)


# ---------------------------------------------------------------- reading files and hub data sets


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl, .json (array of objects, or JSON lines) or .parquet file."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist; give an existing .jsonl/.json/.parquet path or 'embedded'")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict("records")
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise UserError(f"cannot read {path} as parquet: {exc}") from None
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _parse_jsonl(path, text)  # many '.json' files are JSON lines
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            return data
        raise UserError(f"{path} must hold a JSON array of objects (one per row), got {type(data).__name__}")
    if suffix == ".jsonl":
        return _parse_jsonl(path, path.read_text(encoding="utf-8"))
    raise UserError(f"unsupported data file {path}: expected a {', '.join(LOCAL_SUFFIXES)} file")


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, row in jsonl_values(text, str(path)):
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """'hf:<id>[:config][:split]' → (id, config or None, split; default 'train')."""
    parts = uri[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(
            f"bad hub reference {uri!r}: expected 'hf:<dataset id>[:config][:split]', e.g. 'hf:openai/gsm8k:main'"
        )
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def load_hf(uri: str, streaming: bool = False):
    """A Hugging Face data set for an 'hf:' reference; failures become a UserError with a way out.

    streaming=True gives an IterableDataset that reads lazily (for corpora too big to download whole).
    """
    name, config, split = parse_hf_uri(uri)
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, hub errors...
        raise UserError(
            f"cannot load {uri!r} (dataset {name!r}, config {config!r}, split {split!r}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. The hub may be unreachable from this machine (or the id, config or split "
            "is wrong); use a local .jsonl/.json/.parquet path or 'embedded' instead"
        ) from None


# ---------------------------------------------------------------- one row → the common record


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _first_key(keys: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((k for k in candidates if k in keys), None)


def _language(code: str) -> str:
    return LANGUAGE_NAMES.get(code.lower().split("_")[0].split("-")[0], code)


def translation_instruction(source: str, source_lang: str = "en", target_lang: str = "de") -> str:
    return f"Translate the following {_language(source_lang)} text to {_language(target_lang)}:\n\n{source}"


def _schema(kind: str, columns: Sequence[str], where: str) -> str:
    """Which row layout the source uses; a source with none of them is a user error naming its columns."""
    if kind == "translation" and "source" in columns and "target" in columns:
        return "pair"
    if kind == "translation" and "translation" in columns:
        return "translation_dict"
    if _first_key(columns, INSTRUCTION_KEYS) and _first_key(columns, REFERENCE_KEYS):
        return "columns"
    if _first_key(columns, CHAT_KEYS):
        return "chat"
    raise UserError(
        f"{where} has columns {sorted(columns)}, none of the accepted layouts for '{kind}' rows: {ACCEPTED_SCHEMAS}"
    )


def _chat_pair(turns: Any) -> tuple[str, str]:
    """First user turn and the assistant turn after it, in role/content or ShareGPT from/value form."""
    user = ""
    for turn in turns if turns is not None and not isinstance(turns, str) else []:
        if not isinstance(turn, dict):
            continue
        role = turn.get("role", turn.get("from"))
        content = _text(turn.get("content", turn.get("value")))
        if role in ("user", "human") and not user:
            user = content
        elif role in ("assistant", "gpt") and user:
            return user, content
    return user, ""


def normalise_row(row: dict[str, Any], kind: str, schema: str) -> tuple[str, str]:
    """(instruction, reference) of one source row; empty strings where the row lacks them."""
    if schema == "pair":
        source = _text(row.get("source"))
        src = _text(row.get("source_lang")) or "en"
        tgt = _text(row.get("target_lang")) or "de"
        return (translation_instruction(source, src, tgt) if source else ""), _text(row.get("target"))
    if schema == "translation_dict":
        pair = row.get("translation") or {}
        if not isinstance(pair, dict) or len(pair) != 2:
            return "", ""
        src = _text(row.get("source_lang")) or ("en" if "en" in pair else sorted(pair)[0])
        tgt = next(k for k in pair if k != src)
        source = _text(pair.get(src))
        return (translation_instruction(source, src, tgt) if source else ""), _text(pair.get(tgt))
    if schema == "chat":
        key = _first_key(list(row), CHAT_KEYS)
        return _chat_pair(row.get(key)) if key else ("", "")
    keys = list(row)
    instruction = _text(row.get(_first_key(keys, INSTRUCTION_KEYS) or ""))
    extra = _text(row.get("input"))
    if instruction and extra:
        instruction = f"{instruction}\n\n{extra}"
    return instruction, _text(row.get(_first_key(keys, REFERENCE_KEYS) or ""))


# ---------------------------------------------------------------- the public loader


def _pick(n_total: int, limit: int, seed: int, get_row, kind: str, schema: str, where: str) -> list[dict]:
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    rows: list[dict] = []
    skipped = 0
    for index in order:
        if len(rows) == limit:
            break
        raw = get_row(index)
        instruction, reference = normalise_row(raw, kind, schema)
        if not instruction or not reference:
            skipped += 1
            continue
        row_id = raw.get("id")
        rows.append(
            {
                "id": str(row_id) if row_id not in (None, "") else f"{kind}-{index}",
                "kind": kind,
                "instruction": instruction,
                "reference": reference,
            }
        )
    if skipped:
        log.warning("%s: skipped %d rows with an empty instruction or reference", where, skipped)
    if len(rows) < limit:
        log.warning("%s: asked for %d %s rows, only %d are usable; taking all of them", where, limit, kind, len(rows))
    return rows


def load_source(spec: SourceSpec) -> list[dict[str, str]]:
    """Rows `{"id", "kind", "instruction", "reference"}` of one distillation source, seeded and limited."""
    uri = spec.uri.strip()
    if uri == "embedded":
        where = f"embedded {EMBEDDED_FILES[spec.kind]}"
        records = read_records(embedded_path(EMBEDDED_FILES[spec.kind]))
    elif uri.startswith("hf:"):
        where = uri
        dataset = load_hf(uri)
        schema = _schema(spec.kind, list(dataset.column_names), where)
        rows = _pick(len(dataset), spec.limit, spec.seed, lambda i: dataset[i], spec.kind, schema, where)
        log.info("loaded %d %s rows from %s", len(rows), spec.kind, where)
        return rows
    else:
        path = Path(uri).expanduser()
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(
                f"unknown source uri {spec.uri!r}: use 'embedded', a local {'/'.join(LOCAL_SUFFIXES)} path, "
                "or 'hf:<dataset id>[:config][:split]'"
            )
        where = str(path)
        records = read_records(path)
    if not records:
        raise UserError(f"{where} holds no rows")
    schema = _schema(spec.kind, _columns(records), where)
    rows = _pick(len(records), spec.limit, spec.seed, records.__getitem__, spec.kind, schema, where)
    log.info("loaded %d %s rows from %s", len(rows), spec.kind, where)
    return rows


def _columns(records: list[dict[str, Any]]) -> list[str]:
    """Columns present in the file (union over a prefix, so one sparse row does not hide a column)."""
    seen: dict[str, None] = {}
    for record in records[:100]:
        seen.update(dict.fromkeys(record))
    return list(seen)
