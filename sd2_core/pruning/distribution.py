"""Layer-wise sparsity distributions for SparseGPT (SD² Appendix B): uniform, OWL, angular.

WHY non-uniform: layers are not equally prunable. OWL (outlier-weighed layerwise sparsity, Yin et al. 2023)
keeps more weights in layers with more outlier scores |W_ij|·‖X_j‖₂; the angular variant keeps more weights in
blocks that change the residual stream more. Both turn one score per layer into per-layer sparsities with OWL's
scaling: min-max to [0, 2λ], centred, added to the density 1 − s — so the mean sparsity is exactly s and the
spread (max − min) exactly 2λ. The spread is NOT always centred on s: with scaled scores u ∈ [0, 1] and their mean
ū, layer ℓ gets s − 2λ(u_ℓ − ū), so the extremes are s + 2λū and s − 2λ(1 − ū) (s ± λ only when ū = ½).

The scores come from the DENSE model (as OWL's reference does), measured one decoder layer at a time by
`dense_layer_score`; `model_pruner` moves the layers and then prunes layer ℓ at its own sparsity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sd2_core.errors import UserError
from sd2_core.pruning.layer_pruner import angular_distances
from sd2_core.pruning.sparsity import SparsitySpec
from sd2_core.pruning.structure import as_hidden, decoder_linears

DISTRIBUTIONS = ("uniform", "owl", "angular")


def check_distribution(name: str, spec: SparsitySpec, lam: float, threshold_m: float = 5.0) -> None:
    """Refuse what no layer-wise distribution can mean, before anything is computed (configs and direct callers)."""
    if name not in DISTRIBUTIONS:
        raise UserError(f"unknown sparsity distribution {name!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if name == "uniform":
        return
    if spec.is_nm:
        raise UserError(
            f"distribution {name!r} gives each layer its own fraction of zeros; the N:M pattern {spec.label} fixes "
            "it at N/M in every layer. Use an unstructured fraction such as 0.5, or distribution 'uniform'"
        )
    if not threshold_m > 0:
        raise UserError(f"owl_threshold_m must be > 0, got {threshold_m!r}")
    bound = min(spec.fraction, 1.0 - spec.fraction)
    if not 0 < lam < bound:
        raise UserError(
            f"owl_lambda {lam!r} with sparsity {spec.label}: lambda must be in (0, min(s, 1 - s)) = (0, {bound:g}) "
            "so that every layer's sparsity stays in (0, 1)"
        )


def parameters(name: str, threshold_m: float, lam: float) -> dict[str, float]:
    """The parameters a distribution really uses (what the report records)."""
    return {"uniform": {}, "owl": {"threshold_m": threshold_m, "lambda": lam}, "angular": {"lambda": lam}}[name]


def scale_to_sparsities(scores: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from per-layer scores with OWL's scaling; a higher score keeps more weights.

    density_ℓ = 2λ·(u_ℓ − ū) + (1 − s) with u the min-max scaled scores; sparsity_ℓ = 1 − density_ℓ. Equal scores
    (nothing to tell the layers apart) give every layer s. Raises a UserError when a layer would leave (0, 1),
    naming the largest λ that fits these scores.
    """
    values = [float(v) for v in scores]
    lo, hi = min(values), max(values)
    if hi == lo:
        return [float(sparsity)] * len(values)
    unit = [(v - lo) / (hi - lo) for v in values]
    centre = sum(unit) / len(unit)
    result = [sparsity - 2.0 * lam * (u - centre) for u in unit]
    if not all(0.0 < r < 1.0 for r in result):
        fits = min(sparsity / (2.0 * (1.0 - centre)), (1.0 - sparsity) / (2.0 * centre))
        worst = min(range(len(result)), key=lambda i: min(result[i], 1.0 - result[i]))
        raise UserError(
            f"owl_lambda {lam!r} at sparsity {sparsity:g} gives layer {worst} sparsity {result[worst]:.4f}, outside "
            f"(0, 1), on these layer scores; use owl_lambda < {fits:.4g}"
        )
    return result


@torch.no_grad()
def outlier_ratio(weights: Sequence[Tensor], input_sq_norms: Sequence[Tensor], threshold_m: float) -> float:
    """OWL's D_ℓ: the share of the layer's scores |W_ij|·‖X_j‖₂ above M × their mean, over all its Linears at once.

    Two passes (mean, then count) so the layer's scores are never concatenated in memory.
    """
    pairs = list(zip(weights, input_sq_norms, strict=True))

    def score(weight: Tensor, sq: Tensor) -> Tensor:
        return weight.detach().float().abs() * sq.to(weight.device).sqrt().unsqueeze(0)

    total = sum(float(score(w, sq).sum(dtype=torch.float64)) for w, sq in pairs)
    count = sum(w.numel() for w, _ in pairs)
    threshold = threshold_m * total / count
    above = sum(int((score(w, sq) > threshold).sum()) for w, sq in pairs)
    return above / count


def _real_rows(x: Tensor, mask: Tensor) -> Tensor:
    """The non-pad rows [tokens, features] of one sample's [1, L, features] tensor."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[mask.reshape(-1).to(rows.device) != 0]


@torch.no_grad()
def dense_layer_score(
    layer: nn.Module,
    hidden: list[Tensor],
    calls: list[tuple[tuple, dict[str, Any]]],
    attention_mask: Tensor,
    name: str,
    threshold_m: float = 5.0,
) -> tuple[float, list[Tensor]]:
    """Forward every calibration sample through the dense ``layer`` once: (the layer's score, its outputs).

    owl: the outlier ratio D_ℓ, with ‖X_j‖₂² summed over the non-pad rows each Linear reads (the inputs SparseGPT's
    Hessians see: H_jj = 2/n · ‖X_j‖₂², accumulated here directly, in float32 without the d×d matrix).
    angular: the mean over non-pad tokens of arccos(cos(h_in, h_out))/π, by layer_pruner's `angular_distances`
    (n = 1 block, each token a row): the same definition layer pruning uses, over every token instead of the last.
    """
    if name not in ("owl", "angular"):
        raise UserError(f"distribution {name!r} has no layer score; valid: owl, angular")
    linears = decoder_linears(layer) if name == "owl" else {}
    sq = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in linears.items()}
    current: dict[str, Tensor] = {}

    def make_hook(key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = _real_rows(args[0] if args else kwargs["input"], current["mask"]).float()
            sq[key] += (x * x).sum(dim=0).to(sq[key].device)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in linears.items()]
    outputs: list[Tensor] = []
    distance_sum, tokens = 0.0, 0
    try:
        for i, (args, kwargs) in enumerate(calls):
            current["mask"] = attention_mask[i : i + 1]
            out = as_hidden(layer(hidden[i], *args, **kwargs))
            outputs.append(out)
            if name == "angular":
                pair = torch.stack([_real_rows(hidden[i], current["mask"]), _real_rows(out, current["mask"])])
                distance_sum += float(angular_distances(pair, 1)[0]) * pair.shape[1]
                tokens += pair.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    if name == "angular":
        return distance_sum / tokens, outputs
    score = outlier_ratio([m.weight for m in linears.values()], [sq[n] for n in linears], threshold_m)
    return score, outputs
