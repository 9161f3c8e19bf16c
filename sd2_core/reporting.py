"""Every summary sd2 writes of its results, in one place: the cell record, the sweep table and their markdown.

The record `sd2 cell --json` prints is built from the cell's artifacts (`cell_summary`); the sweep's table rows
are built from those records (`cell_rows`), and the markdown for people (Prefect artifacts, summary.md, the
README's tables) from the table. So a number can never differ between the JSON, the table and the text.
`results_recipe` is the sweep's `results` stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from sd2_core.artifacts import Progress, Recipe
from sd2_core.config import OPENLLM_V1, CellConfig
from sd2_core.store import ArtifactRef


def _mal_view(ref: ArtifactRef) -> dict[str, Any]:
    s = ref.summary
    return {"overall": s["mal"], "ci95": s.get("mal_ci"), "per_category": s["mal_per_category"]}


MODELS = ("target", "one_shot", "sd2")


def _evaluation_view(config: CellConfig, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """Accuracy and perplexity of the target and both drafts, and what is significant between the drafts."""
    from sd2_core.confidence import accuracy_difference, paired_mal_difference

    view: dict[str, Any] = {}
    one, sd2 = refs["mal_one_shot"].summary, refs["mal_sd2"].summary
    if "prompt_counts" in one and "prompt_counts" in sd2:
        view["mal_gain"] = paired_mal_difference(sd2["prompt_counts"], one["prompt_counts"])
    accuracy = {m: refs[f"accuracy_{m}"].summary for m in MODELS if f"accuracy_{m}" in refs}
    if accuracy:
        view["accuracy"] = accuracy
        if "one_shot" in accuracy and "sd2" in accuracy:
            view["accuracy_gain"] = {
                task: accuracy_difference(accuracy["sd2"]["tasks"][task], accuracy["one_shot"]["tasks"][task])
                for task in accuracy["sd2"]["tasks"]
            }
    perplexity = {m: refs[f"perplexity_{m}"].summary["perplexity"] for m in MODELS if f"perplexity_{m}" in refs}
    if perplexity:
        view["perplexity"] = perplexity
    view.update(_latency_view(refs))
    return view


def _latency_view(refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """Measured decode-step latency of the three models, c_lat and the practical improvement factor per draft:
    dense storage, and each compressed format the device ran (the target stays dense)."""
    from sd2_core.latency import practical_improvement_factor

    latency = {m: refs[f"latency_{m}"].summary for m in MODELS if f"latency_{m}" in refs}
    if "target" not in latency:
        return {}
    target_s = latency["target"]["median_s"]
    practical: dict[str, Any] = {}
    for stage in STAGES:
        if stage not in latency:
            continue
        mal = refs[f"mal_{stage}"].summary
        measured = {"dense": latency[stage]["median_s"]}
        measured.update(
            {name: f["median_s"] for name, f in latency[stage].get("formats", {}).items() if f.get("median_s")}
        )
        practical[stage] = {
            storage: practical_improvement_factor(mal["mal"], mal["k"], seconds, target_s)
            for storage, seconds in measured.items()
        }
    drafts = latency.get("sd2", latency["target"])  # what the device can do with the draft's weights
    formats = {name: {k: f.get(k) for k in ("supported", "reason")} for name, f in drafts.get("formats", {}).items()}
    return {
        "latency": {m: {"median_s": v["median_s"], "device": v.get("device_name")} for m, v in latency.items()},
        "improvement_factor_practical": practical,
        "compressed_formats": formats,
    }


def cell_summary(config: CellConfig, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """Flatten the artifacts of one cell into the record `sd2 cell --json` prints.

    `refs` holds: target, draft, prune (the one-shot draft: pruned, layer-pruned, or the dense draft itself),
    finetune, reference, mal_one_shot, mal_sd2 and distill/<kind>.
    Timings are the seconds each artifact took to build (a cached rerun reports the original cost).
    Sparsity is of the original draft's decoder Linear weights; for layer pruning the removed blocks count as
    sparse, and fine-tuning cannot bring them back, so the SD² draft keeps the one-shot figure.
    """
    one, sd2 = refs["mal_one_shot"].summary, refs["mal_sd2"].summary
    pruned, tuned = refs["prune"].summary, refs["finetune"].summary
    layer = config.prune.method == "layer"
    return {
        "cell": {
            "target": config.target,
            "draft": config.draft,
            "variant": config.variant,
            "profile": config.profile,
        },
        "mal": {"one_shot": _mal_view(refs["mal_one_shot"]), "sd2": _mal_view(refs["mal_sd2"])},
        "lossless": {"one_shot": one["lossless"], "sd2": sd2["lossless"]},
        "macs_per_token": {
            "draft": sd2["macs_per_token"]["draft"],
            "target": sd2["macs_per_token"]["target"],
            "draft_one_shot": one["macs_per_token"]["draft"],
        },
        "c": sd2["c"],
        "improvement_factor_theoretical": {
            "one_shot": one["improvement_factor_theoretical"],
            "sd2": sd2["improvement_factor_theoretical"],
        },
        "k": sd2["k"],
        "sparsity": {
            "target": None if config.prune.method == "none" else config.prune.sparsity,
            "pruned": pruned["sparsity"],
            "finetuned": pruned["sparsity"] if layer else tuned["sparsity"],
        },
        "params": {
            "one_shot": {"nonzero": pruned["nonzero_params"], "total": pruned["total_params"]},
            "sd2": {"nonzero": tuned["nonzero_params"], "total": tuned["total_params"]},
        },
        "finetune": {
            "loss_first": refs["finetune"].summary["loss_first"],
            "loss_last": refs["finetune"].summary["loss_last"],
            "lr": refs["finetune"].summary["lr"],
            "lr_source": refs["finetune"].summary.get("lr_source"),
            "steps": refs["finetune"].summary.get("steps"),
        },
        "distill": {
            name.split("/", 1)[1]: {k: r.summary.get(k) for k in ("rows", "distilled", "fallbacks", "engine")}
            for name, r in refs.items()
            if name.startswith("distill/")
        },
        **_served_view(refs),
        **_evaluation_view(config, refs),
        "artifacts": {name: r.uri for name, r in refs.items()},
        "timings": {name: r.summary.get("seconds") for name, r in refs.items()},
    }


SERVED_FIELDS = (
    "tokens_per_second_alone",
    "tokens_per_second_with_draft",
    "median_latency_s_alone",
    "median_latency_s_with_draft",
    "speedup",
    "vllm_mal",
    "sd2_mal",
    "identical",
    "total",
    "engine",
)


def _served_view(refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """The `served` block (vLLM alone vs with the draft) of a cell whose target was served; nothing otherwise."""
    served = {stage: refs[f"served_{stage}"].summary for stage in ("one_shot", "sd2") if f"served_{stage}" in refs}
    if not served:
        return {}
    return {"served": {stage: {k: s.get(k) for k in SERVED_FIELDS} for stage, s in served.items()}}


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
    "mal_lo",
    "mal_hi",
    "mal_gain",
    "mal_gain_lo",
    "mal_gain_hi",
    "lossless",
    "lossless_total",
    "improvement_factor_theoretical",
    "latency_draft_ms",
    "latency_target_ms",
    "c_latency",
    "improvement_factor_practical",
    "distill_s",
    "prune_s",
    "finetune_s",
    "mal_s",
    "served_tokens_per_s_alone",
    "served_tokens_per_s_with_draft",
    "served_speedup",
    "served_vllm_mal",
    "served_identical",
    *(f"acc_{task}" for task in OPENLLM_V1),
    "acc_average",
    "acc_target_average",
    "acc_significant",
    "perplexity",
    "perplexity_target",
    "draft_uri",
    "mal_uri",
]
NOT_CATEGORIES = frozenset(COLUMNS)


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
        served = summary.get("served", {}).get(stage)
        if served:
            row["served_tokens_per_s_alone"] = served["tokens_per_second_alone"]
            row["served_tokens_per_s_with_draft"] = served["tokens_per_second_with_draft"]
            row["served_speedup"] = served["speedup"]
            row["served_vllm_mal"] = served["vllm_mal"]
            row["served_identical"] = served["identical"]
        row.update(_evaluation_columns(summary, stage))
        row["c"] = row["macs_per_token_draft"] / row["macs_per_token_target"]
        for category, value in sorted(mal["per_category"].items()):
            row[f"mal_{category}"] = value
        rows.append(row)
    return rows


def _evaluation_columns(summary: dict[str, Any], stage: str) -> dict[str, Any]:
    """One stage's row figures from the cell's evaluation blocks: MAL interval, gain (SD² rows), accuracy, ppl."""
    out: dict[str, Any] = {}
    ci = summary["mal"][stage].get("ci95")
    if ci:
        out["mal_lo"], out["mal_hi"] = ci["lo"], ci["hi"]
    gain = summary.get("mal_gain")
    if gain and stage == "sd2":
        out["mal_gain"], out["mal_gain_lo"], out["mal_gain_hi"] = gain["difference"], gain["lo"], gain["hi"]
    accuracy = summary.get("accuracy", {})
    if stage in accuracy:
        for task, result in accuracy[stage]["tasks"].items():
            out[f"acc_{task}"] = result["value"]
        out["acc_average"] = accuracy[stage]["average"]
    if "target" in accuracy:
        out["acc_target_average"] = accuracy["target"]["average"]
    gains = summary.get("accuracy_gain")
    if gains and stage == "sd2":
        significant = [f"{task} {g['difference']:+.3f}" for task, g in gains.items() if g["significant"]]
        untested = [task for task, g in gains.items() if g["significant"] is None]
        out["acc_significant"] = "; ".join(significant) or "none"
        if untested:
            out["acc_significant"] += f" (no standard error: {', '.join(untested)})"
    latency, practical = summary.get("latency", {}), summary.get("improvement_factor_practical", {})
    if stage in practical:
        out["latency_draft_ms"] = 1000 * latency[stage]["median_s"]
        out["latency_target_ms"] = 1000 * latency["target"]["median_s"]
        out["c_latency"] = practical[stage]["dense"]["c_lat"]
        out["improvement_factor_practical"] = practical[stage]["dense"]["improvement_factor_practical"]
    perplexity = summary.get("perplexity", {})
    if stage in perplexity:
        out["perplexity"] = perplexity[stage]
    if "target" in perplexity:
        out["perplexity_target"] = perplexity["target"]
    return out


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
    categories = sorted(c for c in frame.columns if c.startswith("mal_") and c not in NOT_CATEGORIES)
    return frame[COLUMNS + categories]


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _short(name: Any) -> str:
    """A model reference as a reader knows it: the last part of a path or hub id."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def _mal_ci(r: pd.Series) -> str:
    if pd.isna(r.get("mal_lo")):
        return _fmt(r["mal"], ".3f")
    return f"{r['mal']:.3f} [{r['mal_lo']:.2f}, {r['mal_hi']:.2f}]"


def _target_line(rows: pd.DataFrame, accuracy: bool, perplexity: bool) -> list[str]:
    """The target's own accuracy and perplexity, the reference the drafts' columns are read against."""
    parts = []
    if accuracy and rows["acc_target_average"].notna().any():
        parts.append(f"accuracy avg {rows['acc_target_average'].dropna().iloc[0]:.3f}")
    if perplexity and rows["perplexity_target"].notna().any():
        parts.append(f"perplexity {rows['perplexity_target'].dropna().iloc[0]:.2f}")
    return [f"Target: {', '.join(parts)}.", ""] if parts else []


def significance_lines(frame: pd.DataFrame) -> list[str]:
    """Plain words on which SD² − one-shot differences are significant at this grid's size (95 %)."""
    done = frame[(frame["status"] == "completed") & (frame["stage"] == "sd2")]
    done = done[done["mal_gain"].notna()]
    if done.empty:
        return []
    lines = ["## Is SD² better than one-shot here?", ""]
    for _, r in done.iterrows():
        significant = r["mal_gain_lo"] > 0 or r["mal_gain_hi"] < 0
        verdict = ("significant" if significant else "not significant") + " at 95 % (paired bootstrap over prompts)"
        name = f"{_short(r['draft'])} {r['variant']}"
        if frame["target"].nunique() > 1:
            name += f" → {_short(r['target'])}"
        lines.append(
            f"- {name}: MAL {r['mal_gain']:+.3f} [{r['mal_gain_lo']:+.3f}, {r['mal_gain_hi']:+.3f}], {verdict}"
        )
        if isinstance(r.get("acc_significant"), str):
            lines.append(
                f"  - accuracy differences significant at 95 % (lm-eval standard errors): {r['acc_significant']}"
            )
    lines.append("")
    return lines


def results_tables(frame: pd.DataFrame) -> str:
    """Markdown tables of the completed cells, one per target ← draft pair, with the columns a reader needs.

    Narrow enough for the Prefect artifact pane; every other column is in the table artifact and the CSV.
    """
    done = frame[frame["status"] == "completed"]
    pairs = list(dict.fromkeys(zip(done["target"], done["draft"], strict=True)))
    lines: list[str] = []
    for target, draft in pairs:
        if len(pairs) > 1:
            lines += [f"### {_short(target)} ← {_short(draft)}", ""]
        rows = done[(done["target"] == target) & (done["draft"] == draft)]
        served = bool(rows["served_speedup"].notna().any())  # vLLM columns only where the drafts were served
        accuracy = bool(rows["acc_average"].notna().any())
        perplexity = bool(rows["perplexity"].notna().any())
        practical = bool(rows["improvement_factor_practical"].notna().any())
        head = "| variant | stage | MAL [95 % CI] | lossless | c | MAL/(k·c+1) |"
        head += " c_lat | practical |" if practical else ""
        head += " vLLM MAL | served speed-up |" if served else ""
        head += " accuracy avg |" if accuracy else ""
        head += " perplexity |" if perplexity else ""
        lines += [head, "|" + " --- |" * (head.count("|") - 1)]
        for _, r in rows.iterrows():
            line = (
                f"| {r['variant']} | {'SD²' if r['stage'] == 'sd2' else 'one-shot'} | {_mal_ci(r)} | "
                f"{int(r['lossless'])}/{int(r['lossless_total'])} | {_fmt(r['c'], '.3f')} | "
                f"{_fmt(r['improvement_factor_theoretical'], '.3f')} |"
            )
            if practical:
                line += f" {_fmt(r['c_latency'], '.3f')} | {_fmt(r['improvement_factor_practical'], '.3f')} |"
            if served:
                line += f" {_fmt(r['served_vllm_mal'], '.3f')} | {_fmt(r['served_speedup'], '.2f')}× |"
            if accuracy:
                line += f" {_fmt(r['acc_average'], '.3f')} |"
            if perplexity:
                line += f" {_fmt(r['perplexity'], '.2f')} |"
            lines.append(line)
        lines.append("")
        lines += _target_line(rows, accuracy, perplexity)
    return "\n".join(lines)


def summary_markdown(frame: pd.DataFrame, title: str, images: dict[str, str]) -> str:
    """A short report: counts, the main figures per cell and stage, failures with their errors, then the plots."""
    cells = frame.drop_duplicates(["target", "draft", "variant"])
    failed = cells[cells["status"] == "failed"]
    lines = [f"# {title}", "", f"{len(cells)} cells, {len(cells) - len(failed)} completed, {len(failed)} failed.", ""]
    lines.append(results_tables(frame))
    lines += significance_lines(frame)
    if len(failed):
        lines += ["## Failed cells", ""]
        for _, r in failed.iterrows():
            first_line = str(r["error"]).strip().splitlines()[0] if str(r["error"]).strip() else "(no message)"
            lines.append(f"- {r['target']} / {r['draft']} / {r['variant']}: {first_line}")
    for name, src in images.items():
        lines += ["", f"![{name}]({src})"]
    return "\n".join(lines) + "\n"


def cell_markdown(summary: dict[str, Any]) -> str:
    """One cell's result for people: MAL per category for one-shot and SD², lossless counts, MACs and c."""
    cell, mal = summary["cell"], summary["mal"]
    cats = sorted(set(mal["one_shot"]["per_category"]) | set(mal["sd2"]["per_category"]))
    lines = [
        f"# SD² cell: {cell['draft']} {cell['variant']} → {cell['target']}",
        "",
        "| stage | MAL | " + " | ".join(cats) + " | lossless |",
        "| --- | --- | " + " | ".join("---" for _ in cats) + " | --- |",
    ]
    for stage in STAGES:
        per = mal[stage]["per_category"]
        ll = summary["lossless"][stage]
        lines.append(
            f"| {stage} | {mal[stage]['overall']:.3f} | "
            + " | ".join(f"{per.get(c, float('nan')):.3f}" for c in cats)
            + f" | {ll['identical']}/{ll['total']} |"
        )
    lines += [
        "",
        f"MACs/token draft {summary['macs_per_token']['draft']:,} vs target "
        f"{summary['macs_per_token']['target']:,} (c = {summary['c']:.3f}); "
        f"sparsity after fine-tuning {summary['sparsity']['finetuned']:.4f}",
    ]
    return "\n".join(lines)


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows as plain JSON values (missing figures as null)."""
    frame = results_frame(rows)
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def results_recipe(name: str, rows: list[dict[str, Any]]) -> Recipe:
    """The `results` stage: the sweep's tidy table (parquet + CSV), plots (PNG) and a markdown summary."""
    from sd2_core.plots import draw_all

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        frame = results_frame(rows)
        frame.to_parquet(out / "results.parquet", index=False)
        frame.to_csv(out / "results.csv", index=False)
        images = {p.stem: f"plots/{p.name}" for p in draw_all(frame, out / "plots")}
        (out / "summary.md").write_text(summary_markdown(frame, f"SD² sweep {name}", images))
        cells = frame.drop_duplicates(["target", "draft", "variant"])
        return {
            "name": name,
            "cells": len(cells),
            "failed": int((cells["status"] == "failed").sum()),
            "rows": len(frame),
            "plots": sorted(images.values()),
        }

    return Recipe("results", {"name": name, "rows": rows}, (), build, code=__name__)
