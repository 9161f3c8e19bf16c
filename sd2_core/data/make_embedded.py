"""Rebuild the small real data subsets shipped in `sd2_core/data/embedded/` (maintainer tool, never run by sd2).

Usage: python -m sd2_core.data.make_embedded <shared data folder> [output folder]

The shared data folder is the one described by its MANIFEST.md (byte-identical copies of public files).
Every subset is a prefix of its source in file order, so the output is reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
from pathlib import Path

N_ROWS = 256  # rows kept from each distillation source
C4_BYTES = 200_000  # c4_demo documents are taken whole, in order, until this many UTF-8 bytes
WIKI_ARTICLES = 2  # first wiki_demo articles (one per line) added to the calibration text

OUTPUTS = (
    "spec_bench.jsonl",
    "gsm8k_train_subset.jsonl",
    "instruct_subset.jsonl",
    "translation_subset.jsonl",
    "calibration.jsonl",
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _first_lines(path: Path, n: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(lines) == n:
                break
            lines.append(line.rstrip("\n"))
    return lines


def build(shared: Path, out: Path) -> dict[str, str]:
    """Write every subset into `out`; return {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)

    # SpecBench: the whole file, byte for byte (MAL needs all 480 prompts).
    shutil.copyfile(shared / "spec_bench" / "question.jsonl", out / "spec_bench.jsonl")

    # GSM8K train: the first N lines, byte for byte.
    gsm = _first_lines(shared / "gsm8k" / "train.jsonl", N_ROWS)
    (out / "gsm8k_train_subset.jsonl").write_text("".join(line + "\n" for line in gsm), encoding="utf-8")

    # Alpaca demo: the first N objects of the JSON array, fields unchanged, one per line.
    alpaca = json.loads((shared / "instruct" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:N_ROWS]
    _write_jsonl(out / "instruct_subset.jsonl", [{k: r[k] for k in ("instruction", "input", "output")} for r in alpaca])

    # Multi30k train: the first N aligned en/de lines.
    m30k = shared / "translation" / "multi30k"
    en, de = _first_lines(m30k / "train.en.gz", N_ROWS), _first_lines(m30k / "train.de.gz", N_ROWS)
    pairs = [{"source_lang": "en", "target_lang": "de", "source": s, "target": t} for s, t in zip(en, de, strict=True)]
    _write_jsonl(out / "translation_subset.jsonl", pairs)

    # Calibration: whole C4 documents up to a byte budget, then the first Wikipedia articles.
    docs: list[dict] = []
    used = 0
    with (shared / "calibration" / "c4_demo.jsonl").open(encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if used >= C4_BYTES:
                break
            docs.append({"source": "c4_demo", "text": text})
            used += len(text.encode("utf-8"))
    wiki = _first_lines(shared / "calibration" / "wiki_demo.txt", WIKI_ARTICLES)
    docs += [{"source": "wiki_demo", "text": text} for text in wiki]
    _write_jsonl(out / "calibration.jsonl", docs)

    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in OUTPUTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", type=Path, help="the shared data folder (with MANIFEST.md)")
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "embedded")
    args = parser.parse_args()
    for name, digest in build(args.shared, args.out).items():
        size = (args.out / name).stat().st_size
        print(f"{name}\t{size}\t{digest}")  # noqa: T201 - a maintainer tool's report


if __name__ == "__main__":
    main()
