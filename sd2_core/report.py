"""The one record a cell run reports: what was measured, where the artifacts are, how long each stage took."""

from __future__ import annotations

from typing import Any

from sd2_core.config import CellConfig
from sd2_core.store import ArtifactRef


def _mal_view(ref: ArtifactRef) -> dict[str, Any]:
    s = ref.summary
    return {"overall": s["mal"], "per_category": s["mal_per_category"]}


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
        },
        "distill": {
            name.split("/", 1)[1]: {k: r.summary.get(k) for k in ("rows", "distilled", "fallbacks")}
            for name, r in refs.items()
            if name.startswith("distill/")
        },
        "artifacts": {name: r.uri for name, r in refs.items()},
        "timings": {name: r.summary.get("seconds") for name, r in refs.items()},
    }
