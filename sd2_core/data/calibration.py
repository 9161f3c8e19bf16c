"""Calibration text for SparseGPT: N windows of L tokens of real text, seeded, with a mask for padding.

Windows are cut from whole documents at multiples of L. Full windows are preferred (a seeded random
choice among them); only when the text has too few are shorter pieces (short documents, document
tails) used, longest first and right-padded, with attention_mask 0 on the padding so the pruning
statistics never see a pad token. A `.txt` file is one continuous document; `.jsonl`/`.json`/`.parquet`
files and hub data sets give one document per row of their `text` column.
"""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import torch

from sd2_core.config import CalibrationConfig
from sd2_core.data import embedded_path
from sd2_core.data.sources import load_hf, parse_hf_uri, read_records
from sd2_core.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_FILE = "calibration.jsonl"
TEXT_COLUMN = "text"
HF_SHUFFLE_BUFFER = 10_000  # streaming shuffle buffer for hub data sets (they can be far too big to download)
HF_MAX_DOCS_PER_WINDOW = 50  # stop reading a hub stream after this many documents per requested window


def _texts_of(records: list[dict], where: str) -> list[str]:
    if not records:
        raise UserError(f"calibration source {where} holds no rows")
    if TEXT_COLUMN not in records[0]:
        raise UserError(
            f"calibration source {where} has columns {sorted(records[0])}; it needs a '{TEXT_COLUMN}' column "
            "(or give a .txt file)"
        )
    return [r[TEXT_COLUMN] for r in records if isinstance(r.get(TEXT_COLUMN), str) and r[TEXT_COLUMN].strip()]


def _documents_from_hub(uri: str, tokenizer, cfg: CalibrationConfig) -> list[list[int]]:
    """Stream a seeded shuffle of the hub data set until there are enough full windows (no full download)."""
    name, config, split = parse_hf_uri(uri)
    stream = load_hf(uri, streaming=True).shuffle(seed=cfg.seed, buffer_size=HF_SHUFFLE_BUFFER)
    docs: list[list[int]] = []
    full = 0
    try:
        for row in itertools.islice(stream, HF_MAX_DOCS_PER_WINDOW * cfg.n_samples):
            text = row.get(TEXT_COLUMN)
            if text is None:
                raise UserError(f"calibration data set {name!r} ({config}, {split}) has no '{TEXT_COLUMN}' column")
            if text.strip():
                docs.append(_tokenize(tokenizer, [text])[0])
                full += len(docs[-1]) // cfg.seq_len
            if full >= cfg.n_samples:
                break
    except UserError:
        raise
    except Exception as exc:  # the stream fetches lazily: network errors surface here
        raise UserError(f"reading {uri!r} from the Hugging Face hub failed: {type(exc).__name__}: {exc}") from None
    return docs


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _documents(tokenizer, cfg: CalibrationConfig) -> tuple[list[list[int]], str]:
    uri = cfg.uri.strip()
    if uri.startswith("hf:"):
        return _documents_from_hub(uri, tokenizer, cfg), uri
    if uri == "embedded":
        path, where = embedded_path(EMBEDDED_FILE), f"embedded {EMBEDDED_FILE}"
    else:
        path = Path(uri).expanduser()
        where = str(path)
        if path.suffix.lower() == ".txt":
            if not path.exists():
                raise UserError(f"calibration file {path} does not exist")
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise UserError(f"calibration file {path} is empty")
            return _tokenize(tokenizer, [text]), where
        if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
            raise UserError(
                f"unknown calibration uri {cfg.uri!r}: use 'embedded', a local .txt/.jsonl/.json/.parquet path, "
                "or 'hf:<dataset id>[:config][:split]'"
            )
    return _tokenize(tokenizer, _texts_of(read_records(path), where)), where


def load_calibration(tokenizer, cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both [n_samples, seq_len] int64; mask 0 marks right padding."""
    docs, where = _documents(tokenizer, cfg)
    length = cfg.seq_len
    full: list[tuple[int, int]] = []  # (doc, start) of windows with `length` real tokens
    partial: list[tuple[int, int, int]] = []  # (doc, start, n_real) of shorter pieces
    for d, ids in enumerate(docs):
        n_full = len(ids) // length
        full.extend((d, i * length) for i in range(n_full))
        if len(ids) % length:
            partial.append((d, n_full * length, len(ids) % length))
    if not full and not partial:
        raise UserError(f"calibration source {where} holds no text")
    rng = random.Random(cfg.seed)
    rng.shuffle(full)
    rng.shuffle(partial)
    partial.sort(key=lambda piece: -piece[2])  # stable: random order among equal lengths
    pool = [(d, s, length) for d, s in full] + partial
    chosen = pool[: cfg.n_samples]
    if len(chosen) < cfg.n_samples:
        log.warning(
            "calibration source %s gives only %d distinct windows of %d tokens; repeating them to reach %d",
            where, len(pool), length, cfg.n_samples,
        )  # fmt: skip
        chosen = [pool[i % len(pool)] for i in range(cfg.n_samples)]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((cfg.n_samples, length), pad if pad is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((cfg.n_samples, length), dtype=torch.long)
    for row, (d, start, n_real) in enumerate(chosen):
        input_ids[row, :n_real] = torch.tensor(docs[d][start : start + n_real], dtype=torch.long)
        attention_mask[row, :n_real] = 1
    padded = int((attention_mask == 0).sum())
    log.info(
        "calibration: %d windows x %d tokens from %s (%d documents), %.1f%% padding",
        cfg.n_samples, length, where, len(docs), 100.0 * padded / attention_mask.numel(),
    )  # fmt: skip
    return input_ids, attention_mask
