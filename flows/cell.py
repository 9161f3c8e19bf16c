"""The SD² cell flow: distill → prune → MAL (one-shot) → fine-tune → MAL (SD²), each a cached task; where vLLM is
installed, each MAL stage is followed by the draft served with vLLM (serve). The target (once per target) and each
draft are then evaluated: accuracy (lm-eval), perplexity and decode latency, each where its config enables it."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from sd2_core.artifacts import find_artifact
from sd2_core.config import CellConfig
from sd2_core.placement import check_placements
from sd2_core.reporting import cell_markdown, cell_summary
from sd2_core.serve_bench import serving_enabled
from sd2_core.store import ArtifactRef, Store
from tasks.stage_tasks import (
    accuracy_task,
    distill_task,
    finetune_task,
    latency_task,
    layer_prune_task,
    mal_task,
    materialize_task,
    perplexity_task,
    prune_task,
    reference_task,
    run_stage,
    serve_target_task,
    serve_task,
)


def model_stage(store: str, ref: str, run_name: str) -> ArtifactRef:
    """A model reference as an artifact: one of this store's artifacts as it is, anything else materialized."""
    return find_artifact(Store(store), ref) or run_stage(materialize_task, run_name, store=store, ref=ref)


def target_stages(config: CellConfig) -> dict[str, ArtifactRef]:
    """What every cell of one target shares: the target itself, its distilled data and its greedy reference."""
    store = config.store
    refs: dict[str, ArtifactRef] = {}
    refs["target"] = model_stage(store, config.target, "materialize-target")
    for source in config.sources:
        refs[f"distill/{source.kind}"] = run_stage(
            distill_task,
            f"distill-{source.kind}",
            store=store,
            target=refs["target"],
            source=source,
            cfg=config.distill,
        )
    if serving_enabled(config.serve):  # right after distillation: the same vLLM server, still running
        refs["serve_target"] = run_stage(
            serve_target_task, "serve-target-alone", store=store, target=refs["target"], cfg=config.mal
        )
    refs["reference"] = run_stage(
        reference_task, "target-greedy-reference", store=store, target=refs["target"], cfg=config.mal
    )
    evaluation_stages(config, refs, "target", "target")
    return refs


def evaluation_stages(config: CellConfig, refs: dict[str, ArtifactRef], model: str, label: str) -> None:
    """What a model is judged by besides MAL, as refs["<measure>_<label>"]: accuracy, perplexity, latency."""
    for measure, task_, cfg in (
        ("accuracy", accuracy_task, config.accuracy),
        ("perplexity", perplexity_task, config.perplexity),
        ("latency", latency_task, config.latency),
    ):
        if cfg.enabled:
            name = f"{measure}-{label.replace('_', '-')}"
            refs[f"{measure}_{label}"] = run_stage(task_, name, store=config.store, model=refs[model], cfg=cfg)


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


def mal_stage(config: CellConfig, refs: dict[str, ArtifactRef], draft: str, stage: str) -> None:
    """MAL of the draft `refs[draft]` against the cell's target (on the target's shared greedy reference) as
    refs["mal_<stage>"], then, where the target is served, the draft served by vLLM as refs["served_<stage>"]."""
    refs[f"mal_{stage}"] = run_stage(
        mal_task,
        f"mal-{stage.replace('_', '-')}",
        store=config.store,
        target=refs["target"],
        draft=refs[draft],
        ref=refs["reference"],
        cfg=config.mal,
    )
    if "serve_target" in refs:
        refs[f"served_{stage}"] = run_stage(
            serve_task,
            f"serve-{stage.replace('_', '-')}",
            store=config.store,
            target=refs["target"],
            draft=refs[draft],
            alone=refs["serve_target"],
            cfg=config.mal,
            sd2_mal=refs[f"mal_{stage}"].summary["mal"],
        )


@flow(name="sd2-cell", flow_run_name="cell-{config.draft}-{config.variant}")
def cell_flow(config: CellConfig = CellConfig()) -> dict[str, Any]:  # noqa: B008 - the UI form's default
    """One draft × variant cell against one target; returns the cell's summary record."""
    check_placements(config)
    store = config.store
    refs = target_stages(config)
    refs["draft"] = (
        refs["target"] if config.draft == config.target else model_stage(store, config.draft, "materialize-draft")
    )
    distilled = [refs[f"distill/{source.kind}"] for source in config.sources]
    refs["prune"] = one_shot_stage(config, refs["draft"])
    mal_stage(config, refs, "prune", "one_shot")
    evaluation_stages(config, refs, "prune", "one_shot")
    refs["finetune"] = run_stage(
        finetune_task, "finetune", store=store, draft=refs["prune"], distilled=distilled, cfg=config.finetune
    )
    mal_stage(config, refs, "finetune", "sd2")
    evaluation_stages(config, refs, "finetune", "sd2")
    summary = cell_summary(config, refs)
    create_markdown_artifact(cell_markdown(summary), key="sd2-cell-summary", description="SD² cell result")
    return summary
