"""Rebuild the benchmark subsets shipped in `sd2_core/data/embedded/eval/` (maintainer tool, never run by sd2).

Usage: python -m sd2_core.data.make_eval_sets <shared data folder> [output folder]

Each file is re-shaped into the schema of the Hugging Face dataset that lm-eval's own task reads (ai2_arc,
Rowan/hellaswag, truthful_qa, winogrande, cais/mmlu, gsm8k), so lm-eval's task definitions run on it unchanged
and only their data location is replaced (sd2_core/accuracy.py). Subsets are prefixes in file order, so the
output is reproducible byte for byte. Where the shared copy has no training split (ARC, HellaSwag), the few-shot
pool is a separate set of items that are never scored.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import shutil
from pathlib import Path

ARC_POOL = 50  # ARC-Challenge: the last 50 test items are the 25-shot pool, the rest are scored
HELLASWAG_SCORED = 500  # HellaSwag validation: the first 500 tasks are scored ...
HELLASWAG_POOL = 50  # ... the next 50 are the 10-shot pool
MMLU_PER_SUBJECT = 10  # MMLU: the first 10 test questions of each of the 57 subjects (dev: all 5, the 5-shot pool)
GSM8K_TEST = 250  # GSM8K: the first 250 test problems (the 5-shot pool is the shipped train subset)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc(shared: Path, out: Path) -> None:
    rows = _read_jsonl(shared / "arc_challenge" / "arc_challenge_test.jsonl")
    docs = [
        {
            "id": r["id"],
            "question": r["question"],
            "choices": {"text": [o["text"] for o in r["options"]], "label": [o["label"] for o in r["options"]]},
            "answerKey": r["answer"],
        }
        for r in rows
    ]
    _write_jsonl(out / "arc_challenge_test.jsonl", docs[:-ARC_POOL])
    _write_jsonl(out / "arc_challenge_fewshot.jsonl", docs[-ARC_POOL:])


def _hellaswag(shared: Path, out: Path) -> None:
    with bz2.open(shared / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    docs = []
    for i in range(HELLASWAG_SCORED + HELLASWAG_POOL):
        head, label, *endings = lines[6 * i : 6 * i + 6]
        activity, _, ctx = head.partition(": ")
        # The text form joins ctx_a and ctx_b; lm-eval's preprocessing rebuilds "label: ctx_a ctx_b", so the whole
        # context as ctx_a with an empty ctx_b gives the same query.
        docs.append(
            {"ind": i, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label}
        )
    _write_jsonl(out / "hellaswag_validation.jsonl", docs[:HELLASWAG_SCORED])
    _write_jsonl(out / "hellaswag_fewshot.jsonl", docs[HELLASWAG_SCORED:])


def _truthfulqa(shared: Path, out: Path) -> None:
    rows = json.loads((shared / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    docs = [
        {
            "question": r["question"],
            "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
            "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())},
        }
        for r in rows
    ]
    _write_jsonl(out / "truthfulqa_validation.jsonl", docs)


def _winogrande(shared: Path, out: Path) -> None:
    for source, name in (("dev", "winogrande_validation"), ("train_xs", "winogrande_train")):
        rows = _read_jsonl(shared / "winogrande" / f"{source}.jsonl")
        docs = [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]
        _write_jsonl(out / f"{name}.jsonl", docs)


def _mmlu(shared: Path, out: Path) -> None:
    for split, limit in (("test", MMLU_PER_SUBJECT), ("dev", None)):
        docs = []
        for path in sorted((shared / "mmlu" / split).glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))[:limit]
            docs += [
                {
                    "question": r["question"],
                    "subject": subject,
                    "choices": [r[f"choice{i}"] for i in range(4)],
                    "answer": int(r["answer"]),
                }
                for r in rows
            ]
        _write_jsonl(out / f"mmlu_{split}.jsonl", docs)


def _gsm8k(shared: Path, out: Path) -> None:
    lines = (shared / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:GSM8K_TEST]
    (out / "gsm8k_test.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def build(shared: Path, out: Path) -> dict[str, str]:
    """Write every benchmark subset and the WikiText-2 test file into `out`; return {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    for make in (_arc, _hellaswag, _truthfulqa, _winogrande, _mmlu, _gsm8k):
        make(shared, out)
    shutil.copyfile(shared / "calibration" / "wikitext2_raw_test.raw", out / "wikitext2_test.raw")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.suffix != ".md"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", type=Path, help="the shared data folder (with MANIFEST.md)")
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "embedded" / "eval")
    args = parser.parse_args()
    for name, digest in build(args.shared, args.out).items():
        print(f"{name}\t{(args.out / name).stat().st_size}\t{digest}")  # noqa: T201 - a maintainer tool's report


if __name__ == "__main__":
    main()
