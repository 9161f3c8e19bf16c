"""Layer pruning, the baseline against SparseGPT: drop the n contiguous decoder blocks that change the residual
stream least.

The distance between the residual-stream input of block ℓ and of block ℓ+n is the angular distance
arccos(cos(x_ℓ, x_{ℓ+n})) / π on the last non-pad token of each calibration sequence, averaged over sequences.
The states are read with hooks on the blocks themselves (the input of block ℓ; for ℓ+n = L the output of the last
block), never from `hidden_states[-1]`, which is taken after the final norm and would bias the last group.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sd2_core.errors import UserError
from sd2_core.pruning.structure import (
    as_hidden,
    require_decoder_layers,
)

log = logging.getLogger(__name__)


def blocks_to_drop(num_layers: int, fraction: float) -> int:
    """How many blocks a fraction removes (rounded, at least 1, never all)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"layer-pruning fraction {fraction!r} is out of range; valid: a fraction in (0, 1)")
    n = max(1, round(num_layers * fraction))
    if n >= num_layers:
        raise UserError(
            f"dropping {fraction:.0%} of {num_layers} decoder blocks would leave none; use a smaller fraction"
        )
    return n


def _last_real_token(attention_mask: Tensor) -> Tensor:
    """Index of the last position with mask 1 in each row (padding may be on either side)."""
    positions = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


@torch.no_grad()
def residual_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[L+1, N, H]: the residual stream at the input of every block and at the output of the last, on each sequence's
    last non-pad token."""
    layers = require_decoder_layers(model)
    if (attention_mask.sum(dim=1) == 0).any():
        raise UserError("a calibration sequence is all padding; layer pruning needs at least one real token per row")
    states: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]
    current: dict[str, Tensor] = {}

    def take(hidden: Tensor) -> Tensor:
        return hidden[torch.arange(hidden.shape[0]), current["last"]].float().cpu()

    def make_pre(index: int) -> Callable[..., None]:
        def pre(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            states[index].append(take(args[0] if args else kwargs["hidden_states"]))

        return pre

    def post(_module: nn.Module, _args: tuple, output: Any) -> None:
        states[-1].append(take(as_hidden(output)))

    handles = [layer.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(input_ids.shape[0]):
            mask = attention_mask[i : i + 1]
            current["last"] = _last_real_token(mask)
            model(input_ids=input_ids[i : i + 1].to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if any(len(s) != input_ids.shape[0] for s in states):
        raise RuntimeError("the model's forward did not call each decoder block once per sequence")
    return torch.stack([torch.cat(s) for s in states])


def angular_distances(states: Tensor, n: int) -> Tensor:
    """Mean angular distance between block ℓ's input and block ℓ+n's input, for ℓ = 0 .. L-n (in [0, 1])."""
    num_layers = states.shape[0] - 1
    if not 1 <= n < num_layers + 1:
        raise UserError(f"cannot compare blocks {n} apart in a model with {num_layers} blocks")
    a, b = states[: num_layers - n + 1], states[n:]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(dim=1)


def drop_blocks(model: nn.Module, start: int, n: int) -> nn.Module:
    """A fresh model without blocks start .. start+n-1, the rest renumbered (config, cache indices and all)."""
    layers = require_decoder_layers(model)
    num_layers = len(layers)
    if not (0 <= start and n >= 1 and start + n <= num_layers and n < num_layers):
        raise UserError(f"cannot drop blocks {start}..{start + n - 1} of a model with {num_layers} blocks")
    kept = [i for i in range(num_layers) if not start <= i < start + n]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    renumber = {old: new for new, old in enumerate(kept)}
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            old = int(parts[2])
            if old not in renumber:
                continue
            parts[2] = str(renumber[old])
        state[".".join(parts)] = tensor
    dtype = next(model.parameters()).dtype
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.eval()
    return fresh


def prune_layers(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, fraction: float
) -> tuple[nn.Module, dict[str, Any]]:
    """Drop the contiguous group of `fraction` of the blocks whose removal changes the residual stream least."""
    layers = require_decoder_layers(model)
    n = blocks_to_drop(len(layers), fraction)
    distances = angular_distances(residual_states(model, input_ids, attention_mask), n)
    start = int(torch.argmin(distances))
    log.info(
        "layer pruning: dropping blocks %d..%d of %d (angular distance %.4f)",
        start,
        start + n - 1,
        len(layers),
        float(distances[start]),
    )
    report = {
        "num_layers_before": len(layers),
        "dropped": list(range(start, start + n)),
        "num_layers_after": len(layers) - n,
        "distances": [round(float(d), 6) for d in distances],
        "chosen_distance": float(distances[start]),
    }
    return drop_blocks(model, start, n), report
