"""The sweep's one tidy table: a row per cell × stage (one-shot, SD²), failed cells included with their error.

Built from the cell records that `report.cell_summary` makes, so a table row and `sd2 cell --json` can never
disagree about a number.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from sd2_core.config import CellConfig

STAGES = ("one_shot", "sd2")
COLUMNS = [
    "target",
    "draft",
    "variant",
    "stage",
    "status",
    "error",
    "sparsity",
    "nonzero_params",
    "total_params",
    "macs_per_token_draft",
    "macs_per_token_target",
    "c",
    "k",
    "mal",
    "lossless",
    "lossless_total",
    "improvement_factor_theoretical",
    "distill_s",
    "prune_s",
    "finetune_s",
    "mal_s",
    "draft_uri",
    "mal_uri",
]


def cell_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The two rows (one-shot, SD²) of a finished cell."""
    cell, timings, artifacts = summary["cell"], summary["timings"], summary["artifacts"]
    dense = cell["variant"] == "dense"
    distill_s = sum(v or 0.0 for k, v in timings.items() if k.startswith("distill/"))
    rows = []
    for stage in STAGES:
        mal = summary["mal"][stage]
        lossless = summary["lossless"][stage]
        params = summary["params"][stage]
        row = {
            "target": cell["target"],
            "draft": cell["draft"],
            "variant": cell["variant"],
            "stage": stage,
            "status": "completed",
            "error": "",
            "sparsity": summary["sparsity"]["pruned" if stage == "one_shot" else "finetuned"],
            "nonzero_params": params["nonzero"],
            "total_params": params["total"],
            "macs_per_token_draft": summary["macs_per_token"]["draft_one_shot" if stage == "one_shot" else "draft"],
            "macs_per_token_target": summary["macs_per_token"]["target"],
            "k": summary["k"],
            "mal": mal["overall"],
            "lossless": lossless["identical"],
            "lossless_total": lossless["total"],
            "improvement_factor_theoretical": summary["improvement_factor_theoretical"][stage],
            "distill_s": distill_s,
            "prune_s": math.nan if dense else timings.get("prune"),
            "finetune_s": timings.get("finetune") if stage == "sd2" else math.nan,
            "mal_s": timings.get("mal_one_shot" if stage == "one_shot" else "mal_sd2"),
            "draft_uri": artifacts["prune" if stage == "one_shot" else "finetune"],
            "mal_uri": artifacts["mal_one_shot" if stage == "one_shot" else "mal_sd2"],
        }
        row["c"] = row["macs_per_token_draft"] / row["macs_per_token_target"]
        for category, value in sorted(mal["per_category"].items()):
            row[f"mal_{category}"] = value
        rows.append(row)
    return rows


def failed_rows(config: CellConfig, error: str) -> list[dict[str, Any]]:
    """Placeholder rows of a cell that did not finish: identity, status and error, no figures."""
    return [
        {
            "target": config.target,
            "draft": config.draft,
            "variant": config.variant,
            "stage": stage,
            "status": "failed",
            "error": error,
        }
        for stage in STAGES
    ]


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the fixed columns first, then MAL per category (alphabetical)."""
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    categories = sorted(c for c in frame.columns if c.startswith("mal_") and c not in COLUMNS)
    return frame[COLUMNS + categories]


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def summary_markdown(frame: pd.DataFrame, title: str, images: dict[str, str]) -> str:
    """A short report: counts, the main figures per row, failures with their errors, then the plots."""
    cells = frame.drop_duplicates(["target", "draft", "variant"])
    failed = cells[cells["status"] == "failed"]
    lines = [
        f"# {title}",
        "",
        f"{len(cells)} cells, {len(cells) - len(failed)} completed, {len(failed)} failed.",
        "",
        "| target | draft | variant | stage | sparsity | MAL | lossless | c | MAL/(k·c+1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in frame[frame["status"] == "completed"].iterrows():
        lines.append(
            f"| {r['target']} | {r['draft']} | {r['variant']} | {r['stage']} | {_fmt(r['sparsity'], '.3f')} | "
            f"{_fmt(r['mal'], '.3f')} | {int(r['lossless'])}/{int(r['lossless_total'])} | {_fmt(r['c'], '.3f')} | "
            f"{_fmt(r['improvement_factor_theoretical'], '.3f')} |"
        )
    if len(failed):
        lines += ["", "## Failed cells", ""]
        for _, r in failed.iterrows():
            first_line = str(r["error"]).strip().splitlines()[0] if str(r["error"]).strip() else "(no message)"
            lines.append(f"- {r['target']} / {r['draft']} / {r['variant']}: {first_line}")
    for name, src in images.items():
        lines += ["", f"![{name}]({src})"]
    return "\n".join(lines) + "\n"
