"""Print the README's results table from a sweep's JSON (`sd2 sweep --json > FILE`), so nobody types figures in.

    .venv/bin/python scripts/readme_tables.py bench/results/sweep-cpu.json

One row per target, draft and variant: sparsity, MAL one-shot → SD², lossless counts, the draft's MACs per
token, c and the theoretical improvement factor one-shot → SD²; then the target's MACs per token. The README
holds this output between its `results-table` markers, and a test checks they match.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _macs(value: Any) -> str:
    return "–" if value is None else f"{value / 1e6:.1f} M"


def render(sweep: dict[str, Any]) -> str:
    """The README's markdown for one sweep's JSON output."""
    rows = [r for r in sweep["rows"] if r["status"] == "completed"]
    by_cell: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault((row["target"], row["draft"], row["variant"]), {})[row["stage"]] = row
    several = len({(t, d) for t, d, _ in by_cell}) > 1
    lines = [
        ("| target | draft " if several else "")
        + "| variant | sparsity | MAL one-shot → SD² | lossless | draft MACs/token | c | MAL/(k·c+1) one-shot → SD² |",
        ("| --- | --- " if several else "") + "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (target, draft, variant), stages in by_cell.items():
        one, sd2 = stages["one_shot"], stages["sd2"]
        lines.append(
            (f"| {target} | {draft} " if several else "")
            + f"| {variant} | {_fmt(sd2['sparsity'], '.3f')} | {_fmt(one['mal'], '.3f')} → {_fmt(sd2['mal'], '.3f')} "
            f"| {sd2['lossless']}/{sd2['lossless_total']} | {_macs(sd2['macs_per_token_draft'])} "
            f"| {_fmt(sd2['c'], '.2f')} | {_fmt(one['improvement_factor_theoretical'], '.3f')} → "
            f"{_fmt(sd2['improvement_factor_theoretical'], '.3f')} |"
        )
    targets = {r["target"]: r["macs_per_token_target"] for r in rows}
    lines += ["", "; ".join(f"Target {t}: {_macs(m)} MACs per token." for t, m in targets.items())]
    failed = len({(r["target"], r["draft"], r["variant"]) for r in sweep["rows"] if r["status"] == "failed"})
    if failed:
        lines.append(f"{failed} cell(s) failed and are not shown.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_json", type=Path, help="the output of `sd2 sweep --json`")
    args = parser.parse_args()
    print(render(json.loads(args.sweep_json.read_text())), end="")  # noqa: T201 - the script's output


if __name__ == "__main__":
    main()
