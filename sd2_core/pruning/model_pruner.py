"""Layer-sequential SparseGPT over a decoder-only causal LM, and sparsity accounting.

WHY layer by layer: each decoder layer is pruned on the inputs it will really see at inference —
the outputs of the already *pruned* layers before it — so errors are corrected where they arise
instead of compounding (as in the SparseGPT reference). Only the layer being pruned and the N
hidden-state sequences between layers are live at once, so a model far bigger than the
calibration batch fits on CPU.

Module names are full model paths ("model.layers.0.self_attn.q_proj"), the keying fine-tuning
uses for its fixed masks. Embeddings and lm_head are never touched.

A non-uniform layer-wise distribution (OWL, angular: `distribution.py`) first walks the DENSE model the same way,
one layer at a time, to score every layer; then layer ℓ is pruned at its own sparsity. Uniform skips that pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sd2_core.artifacts import Progress
from sd2_core.errors import UserError
from sd2_core.pruning.distribution import (
    check_distribution,
    dense_layer_score,
    parameters,
    scale_to_sparsities,
)
from sd2_core.pruning.sparsegpt import HessianAccumulator, prepare_hessian, sparsegpt_prune
from sd2_core.pruning.sparsity import SparsitySpec, check_nm_width, parse_sparsity
from sd2_core.pruning.structure import as_hidden, decoder_linears, measure_sparsity, require_decoder_layers

log = logging.getLogger(__name__)

# layer 0's hidden states per sample; per layer, per sample: (args after hidden_states, kwargs)
Calls = tuple[list[Tensor], list[list[tuple[tuple, dict[str, Any]]]]]


class _StopForward(Exception):
    """Raised by the capture hook once the last decoder layer's inputs are recorded: the rest is waste."""


def _capture_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, attention_mask: Tensor) -> Calls:
    """What each decoder layer is called with, per sample: layer 0's hidden states, and every layer's other
    arguments (position embeddings, its own attention mask — which may differ per layer, e.g. sliding-window
    layers —, position ids, cache position, ...). One dense forward per sample, stopped before the last layer runs.
    """
    hidden0: list[Tensor] = []
    calls: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in layers]

    def make_grab(index: int) -> Callable[..., None]:
        def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden0.append(hidden)
            calls[index].append((tuple(args[1:]), kwargs))
            if index == len(layers) - 1:
                raise _StopForward

        return grab

    device = next(model.parameters()).device
    handles = [layer.register_forward_pre_hook(make_grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(
                    input_ids=input_ids[i : i + 1].to(device),
                    attention_mask=attention_mask[i : i + 1].to(device),
                    use_cache=False,
                )
            except _StopForward:
                pass
            if len(hidden0) != i + 1 or any(len(c) != i + 1 for c in calls):
                raise RuntimeError("the model's forward did not call each decoder layer once; cannot capture inputs")
    finally:
        for handle in handles:
            handle.remove()
    return hidden0, calls


def _shared_inputs(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: Tensor, call: tuple[tuple, dict[str, Any]]
) -> list[list[str]]:
    """The layer's Linears grouped by the input tensor they read in one forward (q/k/v share the attention
    input, gate/up the MLP input, in Llama-like blocks), seen from the forward itself rather than from names."""
    seen: dict[str, Tensor] = {}  # the tensors themselves, kept alive: a freed tensor's id() can be reused

    def make_probe(name: str) -> Callable[..., None]:
        def probe(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen[name] = args[0] if args else kwargs["input"]

        return probe

    handles = [m.register_forward_pre_hook(make_probe(n), with_kwargs=True) for n, m in linears.items()]
    try:
        args, kwargs = call
        layer(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in linears:
        same = next((g for g in groups if name in seen and seen.get(g[0]) is seen[name]), None)
        if same is None:
            groups.append([name])  # a Linear never called stays alone
        else:
            same.append(name)
    return groups


def _layer_hessians(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    groups: list[list[str]],
    hidden: list[Tensor],
    calls: list[tuple[tuple, dict[str, Any]]],
    attention_mask: Tensor,
) -> dict[str, HessianAccumulator]:
    """Forward each sample through ``layer`` once, accumulating one input Hessian per group of Linears that
    share their input (keyed by the group's first Linear), without pad rows. Every sample must feed each group
    one tensor; a forward that does otherwise is refused rather than given a wrong shared Hessian."""
    leaders = {group[0]: group for group in groups}
    accumulators = {n: HessianAccumulator(linears[n].in_features, device=linears[n].weight.device) for n in leaders}
    current: dict[str, Any] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any], _output: Any) -> None:
            x = args[0] if args else kwargs["input"]
            current["inputs"][name] = x
            if name in accumulators:
                accumulators[name].add_batch(x, current["mask"])

        return hook

    handles = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in linears.items()]
    try:
        for i, (args, kwargs) in enumerate(calls):
            current["mask"], current["inputs"] = attention_mask[i : i + 1], {}
            layer(hidden[i], *args, **kwargs)
            for group in groups:
                first = current["inputs"].get(group[0])
                if any(current["inputs"].get(n) is not first for n in group[1:]):
                    raise RuntimeError(f"Linears {group} shared one input on the first sample but not on sample {i}")
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _to(device: torch.device, value: Any) -> Any:
    """A captured layer argument (tensor, or tuple/list/dict of them, e.g. rotary (cos, sin)) on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(device, v) for v in value)
    if isinstance(value, dict):
        return {k: _to(device, v) for k, v in value.items()}
    return value


def _zero_fraction(linears: dict[str, nn.Linear]) -> float:
    """Zeros over weights of one layer's Linears together (what its target counts)."""
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / sum(m.weight.numel() for m in linears.values())


def _check_inputs(input_ids: Tensor, attention_mask: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise UserError(f"input_ids must be [N, L] with N >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise UserError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    if int((attention_mask != 0).sum()) == 0:
        raise UserError("attention_mask is all zeros: the calibration batch holds no real token")


def _dense_scores(
    layers: nn.ModuleList,
    hidden: list[Tensor],
    layer_calls: list[list[tuple[tuple, dict[str, Any]]]],
    mask: Tensor,
    work: torch.device,
    name: str,
    threshold_m: float,
) -> list[float]:
    """Every layer's score on the DENSE model (as OWL's reference scores before pruning), one layer on ``work`` at
    a time as the pruner moves them, each put back where it was. ``hidden`` (layer 0's inputs) is left as it is,
    for the pruning pass that follows."""
    scores: list[float] = []
    hidden = _to(work, hidden)
    for index, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(work)
        score, hidden = dense_layer_score(layer, hidden, _to(work, layer_calls[index]), mask, name, threshold_m)
        layer.to(home)
        scores.append(score)
    return scores


def _layer_specs(
    layers: nn.ModuleList,
    calls: Calls,
    mask: Tensor,
    work: torch.device,
    spec: SparsitySpec,
    distribution: str,
    threshold_m: float,
    lam: float,
) -> tuple[list[SparsitySpec], dict[str, Any]]:
    """Each layer's target and the distribution's record (name, parameters, scores, targets). Uniform passes
    ``spec`` itself to every layer, untouched, so its masks are exactly those of a run without distributions."""
    record: dict[str, Any] = {"name": distribution, "parameters": parameters(distribution, threshold_m, lam)}
    if distribution == "uniform":
        specs = [spec] * len(layers)
    else:
        scores = _dense_scores(layers, calls[0], calls[1], mask, work, distribution, threshold_m)
        targets = scale_to_sparsities(scores, spec.fraction, lam)
        specs = [parse_sparsity(t) for t in targets]
        record["scores"] = scores
        log.info("%s layer sparsities: %s", distribution, ", ".join(f"{t:.4f}" for t in targets))
    record["targets"] = [s.fraction for s in specs]
    return specs, record


@torch.no_grad()
def layer_sparsities(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    spec: SparsitySpec | str | float,
    distribution: str,
    threshold_m: float = 5.0,
    lam: float = 0.08,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The distribution's record for ``model`` without pruning it (name, parameters, per-layer scores and targets),
    computed exactly as `prune_model` does before its first layer."""
    spec = parse_sparsity(spec)
    check_distribution(distribution, spec, lam, threshold_m)
    layers = require_decoder_layers(model)
    _check_inputs(input_ids, attention_mask)
    was_training = model.training
    model.eval()
    try:
        work = torch.device(device) if device is not None else next(model.parameters()).device
        calls = _capture_layer_calls(model, layers, input_ids, attention_mask)
        return _layer_specs(layers, calls, attention_mask.to(work), work, spec, distribution, threshold_m, lam)[1]
    finally:
        model.train(was_training)


def prune_model(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    spec: SparsitySpec | str | float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    share_hessians: bool = True,
    distribution: str = "uniform",
    owl_threshold_m: float = 5.0,
    owl_lambda: float = 0.08,
) -> dict[str, Any]:
    """Prune every decoder Linear of ``model`` in place with SparseGPT, one decoder layer after another.

    ``input_ids``/``attention_mask`` [N, L] are the calibration batch; pad positions (mask 0) never enter
    a Hessian. The model stays where it is; with ``device`` (e.g. a GPU) each layer moves there for its
    Hessians (always float32) and its solve, then back, so only one layer and the calibration activations
    occupy the device. Returns a JSON-able report: target label, per-module {sparsity, damp_used, retries,
    error}, overall decoder-Linear sparsity, seconds. ``share_hessians=False`` gives every Linear its own Hessian
    and inverse even where it shares its input with others: the same result, slower (for checks and benchmarks).
    ``distribution`` (uniform | owl | angular, with OWL's M and λ) spreads ``spec`` over the layers; the report's
    ``distribution`` holds its name, parameters, per-layer targets (and scores) and the measured per-layer sparsity.
    """
    spec = parse_sparsity(spec)
    check_distribution(distribution, spec, owl_lambda, owl_threshold_m)
    layers = require_decoder_layers(model)
    _check_inputs(input_ids, attention_mask)
    for name, linear in decoder_linears(model).items():  # fail before the expensive part
        check_nm_width(linear.in_features, spec, name)
    names = {id(module): name for name, module in model.named_modules()}

    start = time.perf_counter()
    n_samples = input_ids.shape[0]
    per_module: dict[str, dict[str, Any]] = {}
    shared_groups: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            home = next(model.parameters()).device
            work = torch.device(device) if device is not None else home
            hidden, calls = _capture_layer_calls(model, layers, input_ids, attention_mask)  # where the model is
            mask = attention_mask.to(work)
            specs, record = _layer_specs(
                layers, (hidden, calls), mask, work, spec, distribution, owl_threshold_m, owl_lambda
            )
            hidden = _to(work, hidden)
            for index, layer in enumerate(layers):
                prefix = names[id(layer)]
                layer.to(work)
                layer_calls = _to(work, calls[index])
                linears = decoder_linears(layer)
                if share_hessians:
                    groups = _shared_inputs(layer, linears, hidden[0], layer_calls[0])
                else:
                    groups = [[name] for name in linears]
                shared_groups.extend(f"{prefix}.{'/'.join(g)}" for g in groups if len(g) > 1)
                hessians = _layer_hessians(layer, linears, groups, hidden, layer_calls, mask)
                for group in groups:
                    # one damped inverse for every Linear of the group: the same result, computed once
                    prepared = prepare_hessian(hessians[group[0]].H, percdamp, name=f"{prefix}.{'/'.join(group)}")
                    for name in group:
                        linear = linears[name]
                        full = f"{prefix}.{name}"
                        result = sparsegpt_prune(linear.weight, prepared, specs[index], blocksize=blocksize, name=full)
                        linear.weight.copy_(result.weight)
                        per_module[full] = {
                            "sparsity": float((linear.weight == 0).float().mean().item()),
                            "damp_used": result.damp_used,
                            "retries": result.retries,
                            "error": result.error,
                        }
                del hessians
                # the pruned layer's outputs are what the next layer will see at inference
                hidden = [as_hidden(layer(h, *a, **kw)) for h, (a, kw) in zip(hidden, layer_calls, strict=True)]
                layer.to(home)
                label = specs[index].label
                log.info("pruned decoder layer %d/%d (%s) to %s", index + 1, len(layers), prefix, label)
                if progress is not None:
                    progress(index + 1, len(layers), f"pruned {prefix} to {label}")
    finally:
        model.train(was_training)

    overall = measure_sparsity(model)["overall"]
    record["measured"] = [_zero_fraction(decoder_linears(layer)) for layer in layers]
    return {
        "spec": spec.label,
        "distribution": record,
        "per_module": per_module,
        "shared_hessians": shared_groups,
        "overall_sparsity": overall,
        "n_samples": n_samples,
        "n_tokens": int((attention_mask != 0).sum()),
        "blocksize": blocksize,
        "percdamp": percdamp,
        "seconds": time.perf_counter() - start,
    }
