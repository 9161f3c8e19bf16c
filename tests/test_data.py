"""Shipped data, distillation sources, calibration windows and MAL prompts (real files, real tokenizer)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
import torch

from sd2_core.config import CalibrationConfig, SourceSpec
from sd2_core.data import EMBEDDED_DIR
from sd2_core.data.answers import final_number, same_final_number
from sd2_core.data.calibration import load_calibration
from sd2_core.data.prompts import load_prompts
from sd2_core.data.sources import load_source
from sd2_core.errors import UserError

SHARED_DATA = Path("/work/shared/data")
SHIPPED = {
    "spec_bench.jsonl": 480,
    "gsm8k_train_subset.jsonl": 256,
    "instruct_subset.jsonl": 256,
    "translation_subset.jsonl": 256,
}
SPECBENCH_CATEGORIES = {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- shipped files


def test_shipped_files_parse_with_expected_counts_and_stay_small():
    for name, count in SHIPPED.items():
        assert len(_jsonl(EMBEDDED_DIR / name)) == count, name
    calibration = _jsonl(EMBEDDED_DIR / "calibration.jsonl")
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in calibration)
    assert {r["source"] for r in calibration} == {"c4_demo", "wiki_demo"}
    assert 200_000 <= (EMBEDDED_DIR / "calibration.jsonl").stat().st_size <= 320_000
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir())
    assert total < 2_000_000
    attribution = (EMBEDDED_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for name in [*SHIPPED, "calibration.jsonl"]:
        assert f"`{name}`" in attribution
        digest = hashlib.sha256((EMBEDDED_DIR / name).read_bytes()).hexdigest()
        assert digest in attribution, f"ATTRIBUTION.md has a stale sha256 for {name}"


def test_translation_pairs_are_aligned_real_sentences():
    rows = _jsonl(EMBEDDED_DIR / "translation_subset.jsonl")
    assert rows[0] == {
        "source_lang": "en",
        "target_lang": "de",
        "source": "Two young, White males are outside near many bushes.",
        "target": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    }
    assert all(r["source"] and r["target"] and r["source"] != r["target"] for r in rows)


@pytest.mark.skipif(not (SHARED_DATA / "MANIFEST.md").exists(), reason="the shared source data folder is not here")
def test_make_embedded_rebuilds_the_shipped_files_byte_for_byte(tmp_path):
    from sd2_core.data.make_embedded import build

    digests = build(SHARED_DATA, tmp_path)
    for name, digest in digests.items():
        assert digest == hashlib.sha256((EMBEDDED_DIR / name).read_bytes()).hexdigest(), name


# ---------------------------------------------------------------- distillation sources


@pytest.mark.parametrize("kind", ["general", "translation", "math"])
def test_embedded_sources_give_normalised_rows(kind):
    rows = load_source(SourceSpec(kind=kind, limit=20, seed=3))
    assert len(rows) == 20
    assert len({r["id"] for r in rows}) == 20
    for row in rows:
        assert set(row) == {"id", "kind", "instruction", "reference"}
        assert row["kind"] == kind
        assert row["instruction"].strip() and row["reference"].strip()
    if kind == "translation":
        assert all(r["instruction"].startswith("Translate the following English text to German:\n\n") for r in rows)
    if kind == "math":
        assert all("\n#### " in r["reference"] for r in rows)  # GSM8K's worked answer is kept whole


def test_every_shipped_gsm8k_reference_has_the_final_number_the_math_check_compares():
    """The distilled-math check compares final numbers: a reference without one would reject every answer."""
    rows = load_source(SourceSpec(kind="math", limit=256))
    assert len(rows) == 256
    for row in rows:
        marked = row["reference"].rsplit("#### ", 1)[1].strip()
        assert final_number(row["reference"]) == Decimal(marked.replace(",", "")), row["id"]
        # the worked solution's last line, restated by the target, is accepted as the same answer
        assert same_final_number(f"So the answer is {marked}.", row["reference"]), row["id"]


def test_general_rows_append_the_input_field():
    raw = _jsonl(EMBEDDED_DIR / "instruct_subset.jsonl")
    with_input = {f"general-{i}": r for i, r in enumerate(raw) if r["input"].strip()}
    rows = load_source(SourceSpec(kind="general", limit=256))
    hits = [r for r in rows if r["id"] in with_input]
    assert hits
    for row in hits:
        source = with_input[row["id"]]
        assert row["instruction"] == f"{source['instruction'].strip()}\n\n{source['input'].strip()}"
        assert row["reference"] == source["output"].strip()


def test_shuffle_is_seeded_and_a_bigger_limit_extends_a_smaller_one():
    a = load_source(SourceSpec(kind="math", limit=10, seed=1))
    b = load_source(SourceSpec(kind="math", limit=10, seed=1))
    c = load_source(SourceSpec(kind="math", limit=10, seed=2))
    d = load_source(SourceSpec(kind="math", limit=25, seed=1))
    assert a == b
    assert [r["id"] for r in a] != [r["id"] for r in c]
    assert d[:10] == a


def test_limit_above_available_takes_all_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="sd2_core.data.sources"):
        rows = load_source(SourceSpec(kind="translation", limit=1000))
    assert len(rows) == 256
    assert "only 256" in caplog.text


def test_local_jsonl_json_and_parquet_sources(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "Name a fruit.", "response": "Apple."},
        {"prompt": "", "response": "skipped: no prompt"},
    ])  # fmt: skip
    rows = load_source(SourceSpec(kind="general", uri=str(jsonl), limit=10))
    assert sorted(r["reference"] for r in rows) == ["Apple.", "Blue."]

    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"id": "q7", "question": "2+2?", "answer": "4"}]), encoding="utf-8")
    assert load_source(SourceSpec(kind="math", uri=str(array), limit=1)) == [
        {"id": "q7", "kind": "math", "instruction": "2+2?", "reference": "4"}
    ]

    chat = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                            {"from": "gpt", "value": "Hello!"}]}],
    )  # fmt: skip
    (row,) = load_source(SourceSpec(kind="general", uri=str(chat), limit=1))
    assert (row["instruction"], row["reference"]) == ("Hi?", "Hello!")

    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"translation": [{"en": "Good morning.", "fr": "Bonjour."}]}).to_parquet(parquet)
    (row,) = load_source(SourceSpec(kind="translation", uri=str(parquet), limit=1))
    assert row["instruction"] == "Translate the following English text to French:\n\nGood morning."
    assert row["reference"] == "Bonjour."


def test_missing_columns_name_what_was_found_and_what_is_accepted(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(UserError) as err:
        load_source(SourceSpec(kind="general", uri=str(bad), limit=1))
    message = str(err.value)
    assert "['label', 'text']" in message and "instruction" in message and "response" in message


def test_bad_jsonl_line_and_unknown_uri_are_user_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        load_source(SourceSpec(kind="general", uri=str(broken), limit=1))
    with pytest.raises(UserError, match="embedded"):
        load_source(SourceSpec(kind="general", uri="data.csv", limit=1))
    with pytest.raises(UserError, match="does not exist"):
        load_source(SourceSpec(kind="general", uri=str(tmp_path / "nope.jsonl"), limit=1))


def test_hub_source_failure_says_the_hub_is_unreachable(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode makes the real datasets call fail at once instead of retrying DNS for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_source(SourceSpec(kind="math", uri="hf:openai/gsm8k:main", limit=4))
    message = str(err.value)
    assert "openai/gsm8k" in message and "'main'" in message
    assert "unreachable" in message and "local" in message and "'embedded'" in message


# ---------------------------------------------------------------- calibration


def test_embedded_calibration_shapes_and_seed(smollm2_tokenizer):
    cfg = CalibrationConfig(n_samples=6, seq_len=64, seed=0)
    ids, mask = load_calibration(smollm2_tokenizer, cfg)
    assert ids.shape == mask.shape == (6, 64)
    assert ids.dtype == mask.dtype == torch.long
    assert bool(mask.all())  # the shipped text has plenty of full 64-token windows
    again, _ = load_calibration(smollm2_tokenizer, cfg)
    other, _ = load_calibration(smollm2_tokenizer, cfg.model_copy(update={"seed": 1}))
    assert torch.equal(ids, again)
    assert not torch.equal(ids, other)
    text = smollm2_tokenizer.decode(ids[0])
    assert sum(ch.isalpha() for ch in text) > 0.6 * len(text)  # real prose, not ids of padding


def test_short_documents_are_right_padded_with_mask_zero(smollm2_tokenizer, tmp_path, caplog):
    short = "A short note."
    long = " ".join(f"Sentence number {i} of a longer document about rivers." for i in range(30))
    path = _write_jsonl(tmp_path / "calib.jsonl", [{"text": short}, {"text": long}, {"text": "   "}])
    seq_len = 32
    n_short = len(smollm2_tokenizer(short, add_special_tokens=False)["input_ids"])
    n_long = len(smollm2_tokenizer(long, add_special_tokens=False)["input_ids"])
    n_pool = n_long // seq_len + (1 if n_long % seq_len else 0) + 1
    with caplog.at_level(logging.WARNING, logger="sd2_core.data.calibration"):
        cfg = CalibrationConfig(uri=str(path), n_samples=n_pool + 2, seq_len=seq_len)
        ids, mask = load_calibration(smollm2_tokenizer, cfg)
    assert "repeating" in caplog.text
    lengths = mask.sum(dim=1).tolist()
    full_windows = n_long // seq_len
    assert lengths[:full_windows] == [seq_len] * full_windows  # full windows come first
    assert n_short in lengths
    pad = smollm2_tokenizer.pad_token_id
    for row, n_real in enumerate(lengths):
        assert bool(mask[row, :n_real].all()) and not bool(mask[row, n_real:].any())  # right padding only
        assert bool((ids[row, n_real:] == pad).all())
    row = lengths.index(n_short)
    assert smollm2_tokenizer.decode(ids[row, :n_short]) == short


def test_txt_calibration_is_one_stream_and_bad_sources_are_user_errors(smollm2_tokenizer, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    ids, mask = load_calibration(smollm2_tokenizer, CalibrationConfig(uri=str(txt), n_samples=4, seq_len=16))
    assert ids.shape == (4, 16) and bool(mask.all())
    no_text = _write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    with pytest.raises(UserError, match="'text' column"):
        load_calibration(smollm2_tokenizer, CalibrationConfig(uri=str(no_text)))
    with pytest.raises(UserError, match="unknown calibration uri"):
        load_calibration(smollm2_tokenizer, CalibrationConfig(uri="corpus.docx"))


# ---------------------------------------------------------------- MAL prompts


def test_specbench_prompts_have_six_categories_of_eighty():
    items = load_prompts()
    assert len(items) == 480
    counts = Counter(item.category for item in items)
    assert set(counts) == SPECBENCH_CATEGORIES
    assert set(counts.values()) == {80}
    assert len({item.id for item in items}) == 480
    mt_bench = [item for item in items if item.category == "mt_bench"]
    assert all(len(item.turns) == 2 for item in mt_bench)
    assert all(len(item.turns) == 1 for item in items if item.category != "mt_bench")
    assert mt_bench[0].id == "81" and mt_bench[0].turns[0].startswith("Compose an engaging travel blog post")


def test_per_category_takes_the_first_of_each_in_file_order():
    items = load_prompts("specbench", per_category=2)
    assert len(items) == 12
    assert Counter(item.category for item in items) == {c: 2 for c in SPECBENCH_CATEGORIES}
    assert [item.id for item in items if item.category == "mt_bench"] == ["81", "82"]


def test_custom_prompt_file_and_bad_rows(tmp_path):
    good = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Tell me a joke."},
        {"question_id": 9, "category": "coding", "turns": ["Write FizzBuzz.", "Now in Rust."]},
        {"turns": ["Summarise this."], "category": "summarization"},
    ])  # fmt: skip
    items = load_prompts(str(good))
    assert [(i.id, i.category, i.turns) for i in items] == [
        ("1", "custom", ["Tell me a joke."]),
        ("9", "mt_bench", ["Write FizzBuzz.", "Now in Rust."]),
        ("3", "summarization", ["Summarise this."]),
    ]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "fine too"}, {"text": "no prompt"}])
    with pytest.raises(UserError, match="line 3"):
        load_prompts(str(bad))
    empty_turns = _write_jsonl(tmp_path / "empty.jsonl", [{"turns": []}])
    with pytest.raises(UserError, match="line 1"):
        load_prompts(str(empty_turns))
    with pytest.raises(UserError, match="specbench"):
        load_prompts("prompts.csv")
