"""Print the README's results table from a sweep's JSON (`sd2 sweep --json > FILE`), so nobody types figures in.

    .venv/bin/python scripts/readme_tables.py bench/results/sweep-cpu.json

One row per target, draft and variant: sparsity, MAL one-shot → SD² with the paired 95 % interval of the gain,
lossless counts, the draft's MACs per token, c and the theoretical improvement factor, c_lat and the practical
factor (measured latency) one-shot → SD²; a second table with accuracy (lm-eval) and perplexity; then the target's
own figures. The README holds this output between its `results-table` markers, and a test checks they match.
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


def _arrow(one: dict[str, Any], sd2: dict[str, Any], key: str, spec: str) -> str:
    return f"{_fmt(one.get(key), spec)} → {_fmt(sd2.get(key), spec)}"


def _gain(sd2: dict[str, Any]) -> str:
    if sd2.get("mal_gain") is None:
        return "–"
    significant = sd2["mal_gain_lo"] > 0 or sd2["mal_gain_hi"] < 0
    return f"{sd2['mal_gain']:+.3f} [{sd2['mal_gain_lo']:+.2f}, {sd2['mal_gain_hi']:+.2f}]{' *' if significant else ''}"


ACCURACY = ("arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k", "mmlu")


def render(sweep: dict[str, Any]) -> str:
    """The README's markdown for one sweep's JSON output."""
    rows = [r for r in sweep["rows"] if r["status"] == "completed"]
    by_cell: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault((row["target"], row["draft"], row["variant"]), {})[row["stage"]] = row
    several = len({(t, d) for t, d, _ in by_cell}) > 1
    lead = "| target | draft " if several else ""
    rule = "| --- | --- " if several else ""
    lines = [
        lead + "| variant | sparsity | MAL one-shot → SD² | SD² − one-shot [95 % CI] | lossless | draft MACs/token | c "
        "| MAL/(k·c+1) one-shot → SD² | c_lat | MAL/(k·c_lat+1) one-shot → SD² |",
        rule + "|" + " --- |" * 10,
    ]
    for (target, draft, variant), stages in by_cell.items():
        one, sd2 = stages["one_shot"], stages["sd2"]
        lines.append(
            (f"| {target} | {draft} " if several else "")
            + f"| {variant} | {_fmt(sd2['sparsity'], '.3f')} | {_arrow(one, sd2, 'mal', '.3f')} | {_gain(sd2)} "
            f"| {sd2['lossless']}/{sd2['lossless_total']} | {_macs(sd2['macs_per_token_draft'])} "
            f"| {_fmt(sd2['c'], '.2f')} | {_arrow(one, sd2, 'improvement_factor_theoretical', '.3f')} "
            f"| {_fmt(sd2.get('c_latency'), '.2f')} | {_arrow(one, sd2, 'improvement_factor_practical', '.3f')} |"
        )
    if any(r.get("acc_average") is not None for r in rows):
        lines += ["", lead + "| variant | " + " | ".join(ACCURACY) + " | average | perplexity |"]
        lines.append(rule + "|" + " --- |" * (len(ACCURACY) + 3))
        for (target, draft, variant), stages in by_cell.items():
            one, sd2 = stages["one_shot"], stages["sd2"]
            cells = [_arrow(one, sd2, f"acc_{task}", ".2f") for task in ACCURACY]
            lines.append(
                (f"| {target} | {draft} " if several else "")
                + f"| {variant} | "
                + " | ".join(cells)
                + f" | {_arrow(one, sd2, 'acc_average', '.3f')} | {_arrow(one, sd2, 'perplexity', '.1f')} |"
            )
    lines.append("")
    for target in dict.fromkeys(r["target"] for r in rows):
        row = next(r for r in rows if r["target"] == target)
        facts = [f"{_macs(row['macs_per_token_target'])} MACs per token"]
        if row.get("latency_target_ms") is not None:
            facts.append(f"{row['latency_target_ms']:.1f} ms per decode step")
        if row.get("acc_target_average") is not None:
            facts.append(f"accuracy average {row['acc_target_average']:.3f}")
        if row.get("perplexity_target") is not None:
            facts.append(f"perplexity {row['perplexity_target']:.1f}")
        lines.append(f"Target {target}: {', '.join(facts)}.")
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
