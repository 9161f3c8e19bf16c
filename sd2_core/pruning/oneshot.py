"""The one-shot stages: SparseGPT (`prune`) and layer pruning (`layerprune`) of a draft, as store artifacts.

Both read the draft and the calibration text the same way and write a plain HF folder plus their report;
the science is in `model_pruner` / `sparsegpt` and in `layer_pruner`. (The key's code digest covers this
module and both pruners, so an edit to either pruner rebuilds both stages' artifacts.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sd2_core.artifacts import Progress, Recipe, data_identity, write_json
from sd2_core.config import PruneConfig
from sd2_core.errors import UserError
from sd2_core.models import load_artifact, save_model
from sd2_core.placement import Placement, placement_of
from sd2_core.pruning.sparsity import parse_sparsity
from sd2_core.pruning.structure import decoder_linears, measure_sparsity, params_summary
from sd2_core.store import ArtifactRef, Store


def _draft_and_calibration(store: Store, draft: ArtifactRef, cfg: PruneConfig, placement: Placement, device):
    from sd2_core.data.calibration import load_calibration

    model, tokenizer = load_artifact(store, draft, placement.dtype, device)
    return model, tokenizer, *load_calibration(tokenizer, cfg.calibration)


def _key_config(cfg: PruneConfig, placement: Placement, *fields: str) -> dict[str, Any]:
    """The key's config: the given fields (all but method/device/dtype when none), the resolved placement,
    and the calibration data's identity."""
    dumped = cfg.model_dump(mode="json", exclude={"method", "device", "dtype"})
    chosen = {k: dumped[k] for k in fields} if fields else dumped
    return {**chosen, "placement": placement.identity, **data_identity(cfg.calibration.uri)}


def _distribution_summary(record: dict[str, Any]) -> dict[str, Any]:
    """How the sparsity was spread over the layers (name, parameters, per-layer target and measured, layer order),
    rounded for the manifest; `prune_report.json` keeps the full record with the layers' scores."""
    return {
        "distribution": record["name"],
        "distribution_parameters": record["parameters"],
        "layer_sparsity_target": [round(t, 6) for t in record["targets"]],
        "layer_sparsity": [round(m, 6) for m in record["measured"]],
    }


def prune_recipe(store: Store, draft: ArtifactRef, cfg: PruneConfig) -> Recipe:
    """The `prune` stage: SparseGPT one-shot pruning of the draft on real calibration text."""
    from sd2_core.pruning.model_pruner import prune_model

    if cfg.method != "sparsegpt":
        raise UserError(f"prune runs SparseGPT; method {cfg.method!r} belongs to another stage (see variant_prune)")
    spec = parse_sparsity(cfg.sparsity)
    placement = placement_of(cfg)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        # the draft stays on the CPU; one layer at a time goes to the placement's device
        model, tokenizer, input_ids, attention_mask = _draft_and_calibration(store, draft, cfg, placement, "cpu")
        report = prune_model(
            model,
            input_ids,
            attention_mask,
            spec,
            blocksize=cfg.blocksize,
            percdamp=cfg.percdamp,
            progress=progress,
            device=placement.device,
            distribution=cfg.distribution,
            owl_threshold_m=cfg.owl_threshold_m,
            owl_lambda=cfg.owl_lambda,
        )
        sparsity = measure_sparsity(model)
        save_model(model, tokenizer, out)
        write_json(out / "prune_report.json", {"report": report, "sparsity": sparsity})
        return {
            "sparsity_target": spec.label,
            **params_summary(sparsity),
            "damp_retries": sum(int(m.get("retries", 0)) for m in report["per_module"].values()),
            **_distribution_summary(report["distribution"]),
        }

    # The stage is SparseGPT: `method` is implied by it and stays out of the key.
    return Recipe("prune", _key_config(cfg, placement), (draft,), build, code=__name__)


def layer_prune_recipe(store: Store, draft: ArtifactRef, cfg: PruneConfig) -> Recipe:
    """The `layerprune` stage: drop the `sparsity` fraction of the draft's blocks with the least angular distance."""
    from sd2_core.pruning.layer_pruner import prune_layers

    if cfg.method != "layer":
        raise UserError(f"layer_prune drops decoder blocks; method {cfg.method!r} belongs to another stage")
    fraction = parse_sparsity(cfg.sparsity).fraction
    placement = placement_of(cfg)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        # forward passes only: the whole draft on the device
        model, tokenizer, input_ids, attention_mask = _draft_and_calibration(
            store, draft, cfg, placement, placement.device
        )
        linear_before = sum(m.weight.numel() for m in decoder_linears(model).values())
        if progress:
            progress(0, 1, "measuring angular distances between blocks")
        pruned, report = prune_layers(model, input_ids, attention_mask, fraction)
        if progress:
            progress(1, 1, f"dropped blocks {report['dropped'][0]}..{report['dropped'][-1]}")
        linear_nonzero_after = sum(int(torch.count_nonzero(m.weight)) for m in decoder_linears(pruned).values())
        save_model(pruned, tokenizer, out)
        write_json(out / "layer_prune_report.json", report)
        return {
            "sparsity_target": cfg.sparsity,
            **params_summary(measure_sparsity(pruned)),
            # of the original draft's decoder Linear weights, the fraction that is gone (removed or zero)
            "sparsity": 1.0 - linear_nonzero_after / linear_before,
            "dropped": report["dropped"],
            "num_layers_after": report["num_layers_after"],
        }

    return Recipe("layerprune", _key_config(cfg, placement, "sparsity", "calibration"), (draft,), build, code=__name__)
