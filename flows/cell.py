"""The SD² cell flow: distill → prune → MAL (one-shot) → fine-tune → MAL (SD²), each a cached task."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from sd2_core.config import CellConfig
from sd2_core.report import cell_summary
from sd2_core.store import ArtifactRef
from tasks.stages import (
    distill_task,
    finetune_task,
    layer_prune_task,
    mal_task,
    materialize_task,
    prune_task,
    reference_task,
    run_stage,
)


def target_stages(config: CellConfig) -> dict[str, ArtifactRef]:
    """What every cell of one target shares: the target itself, its distilled data and its greedy reference."""
    store = config.store
    refs: dict[str, ArtifactRef] = {}
    refs["target"] = run_stage(materialize_task, "materialize-target", store=store, ref=config.target)
    for source in config.sources:
        refs[f"distill/{source.kind}"] = run_stage(
            distill_task,
            f"distill-{source.kind}",
            store=store,
            target=refs["target"],
            source=source,
            cfg=config.distill,
        )
    refs["reference"] = run_stage(
        reference_task, "target-greedy-reference", store=store, target=refs["target"], cfg=config.mal
    )
    return refs


@flow(name="sd2-distill", flow_run_name="distill-{config.target}")
def distill_flow(config: CellConfig = CellConfig()) -> dict[str, Any]:  # noqa: B008 - the UI form's default
    """Per target: distillation of every dataset and the greedy reference, shared by all cells of that target."""
    return {name: ref.to_dict() for name, ref in target_stages(config).items()}


def one_shot_stage(config: CellConfig, draft: ArtifactRef) -> ArtifactRef:
    """The variant's one-shot draft: SparseGPT, layer pruning, or the dense draft itself."""
    method, store = config.prune.method, config.store
    if method == "sparsegpt":
        return run_stage(prune_task, f"prune-{config.prune.sparsity}", store=store, draft=draft, cfg=config.prune)
    if method == "layer":
        return run_stage(
            layer_prune_task, f"layer-prune-{config.prune.sparsity}", store=store, draft=draft, cfg=config.prune
        )
    return draft


@flow(name="sd2-cell", flow_run_name="cell-{config.draft}-{config.variant}")
def cell_flow(config: CellConfig = CellConfig()) -> dict[str, Any]:  # noqa: B008 - the UI form's default
    """One draft × variant cell against one target; returns the cell's summary record."""
    store = config.store
    refs = target_stages(config)
    refs["draft"] = (
        refs["target"]
        if config.draft == config.target
        else run_stage(materialize_task, "materialize-draft", store=store, ref=config.draft)
    )
    distilled = [refs[f"distill/{source.kind}"] for source in config.sources]
    refs["prune"] = one_shot_stage(config, refs["draft"])
    refs["mal_one_shot"] = run_stage(
        mal_task,
        "mal-one-shot",
        store=store,
        target=refs["target"],
        draft=refs["prune"],
        ref=refs["reference"],
        cfg=config.mal,
    )
    refs["finetune"] = run_stage(
        finetune_task, "finetune", store=store, draft=refs["prune"], distilled=distilled, cfg=config.finetune
    )
    refs["mal_sd2"] = run_stage(
        mal_task,
        "mal-sd2",
        store=store,
        target=refs["target"],
        draft=refs["finetune"],
        ref=refs["reference"],
        cfg=config.mal,
    )
    summary = cell_summary(config, refs)
    create_markdown_artifact(_markdown(summary), key="sd2-cell-summary", description="SD² cell result")
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    cell, mal = summary["cell"], summary["mal"]
    cats = sorted(set(mal["one_shot"]["per_category"]) | set(mal["sd2"]["per_category"]))
    lines = [
        f"# SD² cell: {cell['draft']} {cell['variant']} → {cell['target']}",
        "",
        "| stage | MAL | " + " | ".join(cats) + " | lossless |",
        "| --- | --- | " + " | ".join("---" for _ in cats) + " | --- |",
    ]
    for stage in ("one_shot", "sd2"):
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
