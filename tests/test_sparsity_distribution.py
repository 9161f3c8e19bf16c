"""Layer-wise sparsity distributions (uniform, OWL, angular) for SparseGPT: the scaling, the scores, the pruning.

The layer scores are recomputed here from their definitions, on a full batched forward of the dense model with
hooks, independently of the pruner's layer-by-layer pass. A real tiny random Llama (4 layers) reads real text from
the calibration loader, with one row right-padded so that pad tokens must stay out of every score.
"""

from __future__ import annotations

import copy
import json
import math

import pydantic
import pytest
import torch
from torch import nn

from sd2_core.artifacts import produce
from sd2_core.config import CalibrationConfig, PruneConfig
from sd2_core.data.calibration import load_calibration
from sd2_core.errors import UserError
from sd2_core.models import model_recipe
from sd2_core.pruning import decoder_linears, prune_model
from sd2_core.pruning.distribution import scale_to_sparsities
from sd2_core.pruning.model_pruner import layer_sparsities
from sd2_core.pruning.oneshot import prune_recipe
from sd2_core.store import Store

LAYERS = 4
S, LAM, M = 0.5, 0.08, 5.0


@pytest.fixture(scope="module")
def dense(tiny_llama) -> nn.Module:
    return tiny_llama(num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def calibration(smollm2_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Real text, 4 × 32 tokens, the last 8 positions of row 1 turned into padding."""
    ids, mask = load_calibration(smollm2_tokenizer, CalibrationConfig(n_samples=4, seq_len=32))
    ids, mask = ids.clone(), mask.clone()
    mask[1, 24:] = 0
    ids[1, 24:] = smollm2_tokenizer.pad_token_id
    return ids, mask


def _layer_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    return [decoder_linears(layer) for layer in model.model.layers]


def owl_ratios(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """D_ℓ by its definition: share of |W_ij|·‖X_j‖₂ over all of layer ℓ's Linears above M × their mean."""
    rows: dict[nn.Module, torch.Tensor] = {}
    hooks = [
        linear.register_forward_hook(lambda mod, args, _out: rows.__setitem__(mod, args[0][mask.bool()]))
        for layer in _layer_linears(model)
        for linear in layer.values()
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    ratios = []
    for layer in _layer_linears(model):
        scores = torch.cat([(m.weight.abs() * rows[m].norm(dim=0)).flatten() for m in layer.values()])
        ratios.append(float((scores > M * scores.mean()).double().mean()))
    return ratios


def angular_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """d_ℓ by its definition: mean over real tokens of arccos(cos(block input, block output)) / π."""
    seen: dict[int, list[torch.Tensor]] = {}

    def pre(index):
        return lambda _m, args, kwargs: seen.__setitem__(index, [(args[0] if args else kwargs["hidden_states"])])

    def post(index):
        return lambda _m, _args, out: seen[index].append(out[0] if isinstance(out, tuple) else out)

    layers = model.model.layers
    hooks = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    result = []
    for i in range(len(layers)):
        h_in, h_out = (t[mask.bool()].double() for t in seen[i])
        cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).clamp(-1, 1)
        result.append(float((torch.arccos(cos) / math.pi).mean()))
    return result


INDEPENDENT = {"owl": owl_ratios, "angular": angular_scores}


# ---------------------------------------------------------------- the scaling


def test_scaling_on_hand_picked_scores():
    # evenly spread scores: the scaled mean is λ, so the layers span exactly s ± λ
    assert scale_to_sparsities([0, 1, 2, 3], 0.5, 0.09) == pytest.approx([0.59, 0.53, 0.47, 0.41])
    # one outlier layer: still mean s and spread 2λ, but the scaled mean is λ/2, so s + λ/2 .. s − 3λ/2
    assert scale_to_sparsities([1, 1, 4, 1], 0.5, 0.08) == pytest.approx([0.54, 0.54, 0.38, 0.54])
    # only the order and the relative gaps matter, not the scores' scale or offset
    assert scale_to_sparsities([10, 30, 20], 0.6, 0.05) == pytest.approx(scale_to_sparsities([0, 2, 1], 0.6, 0.05))
    assert scale_to_sparsities([0.2, 0.2, 0.2], 0.7, 0.1) == [0.7, 0.7, 0.7]  # nothing to tell the layers apart


def test_scaling_refuses_a_layer_outside_zero_one_and_names_the_lambda_that_fits():
    # s = 0.1, λ = 0.09 < min(s, 1 − s), yet the outlier layer would get 0.1 − 2·0.09·0.75 < 0
    with pytest.raises(UserError, match=r"owl_lambda 0\.09 .* layer 3 sparsity -0\.0350.*owl_lambda < 0\.06667"):
        scale_to_sparsities([0, 0, 0, 1], 0.1, 0.09)


# ---------------------------------------------------------------- the scores and the targets


@pytest.fixture(scope="module")
def records(dense, calibration) -> dict[str, dict]:
    return {name: layer_sparsities(dense, *calibration, S, name, M, LAM) for name in INDEPENDENT}


@pytest.mark.parametrize("name", ["owl", "angular"])
def test_targets_follow_the_dense_scores(name, dense, calibration, records):
    record = records[name]
    targets, scores = record["targets"], INDEPENDENT[name](dense, *calibration)
    assert record["name"] == name and len(targets) == LAYERS
    assert record["parameters"] == ({"threshold_m": M, "lambda": LAM} if name == "owl" else {"lambda": LAM})
    # the pruner's layer-by-layer scores are the definitions' (an outlier count may differ by one score at most)
    smallest = min(sum(m.weight.numel() for m in layer.values()) for layer in _layer_linears(dense))
    assert record["scores"] == pytest.approx(scores, abs=1.01 / smallest if name == "owl" else 1e-6)
    assert len(set(scores)) == LAYERS, "the test needs layers that the score tells apart"
    assert sum(targets) / LAYERS == pytest.approx(S, abs=1e-6)
    # min-max scaling: the spread is exactly 2λ, around s (s ± λ only when the scaled scores average λ)
    assert max(targets) - min(targets) == pytest.approx(2 * LAM, abs=1e-9)
    assert all(S - 2 * LAM <= t <= S + 2 * LAM for t in targets)
    # more outliers / a bigger change of the residual stream keeps more weights: the order is reversed exactly
    assert targets.index(min(targets)) == scores.index(max(scores))
    assert sorted(range(LAYERS), key=targets.__getitem__) == sorted(range(LAYERS), key=scores.__getitem__)[::-1]
    assert targets == pytest.approx(scale_to_sparsities(scores, S, LAM), abs=1e-6)


@pytest.fixture(scope="module")
def pruned(dense, calibration) -> dict[str, tuple[nn.Module, dict]]:
    out = {}
    for name in ("uniform", *INDEPENDENT):
        model = copy.deepcopy(dense)
        out[name] = model, prune_model(model, *calibration, S, distribution=name, owl_threshold_m=M, owl_lambda=LAM)
    return out


@pytest.mark.parametrize("name", ["owl", "angular"])
def test_each_layer_is_pruned_to_its_target(name, pruned, records):
    model, report = pruned[name]
    record = report["distribution"]
    assert record["targets"] == records[name]["targets"]  # scored on the dense model, not on the pruned one
    for index, (target, linears) in enumerate(zip(record["targets"], _layer_linears(model), strict=True)):
        zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
        total = sum(m.weight.numel() for m in linears.values())
        # SparseGPT rounds round(s·n) per 128-column block of each Linear: at most half a weight off per block
        blocks = sum(math.ceil(m.in_features / 128) for m in linears.values())
        assert abs(zeros - target * total) <= blocks / 2, f"layer {index}"
        assert record["measured"][index] == zeros / total
    assert report["overall_sparsity"] == pytest.approx(S, abs=1e-3)
    json.dumps(report)


def test_uniform_prunes_every_layer_at_s_with_no_extra_pass(dense, calibration, pruned):
    model, report = pruned["uniform"]
    assert report["distribution"] == {
        "name": "uniform",
        "parameters": {},
        "targets": [S] * LAYERS,
        "measured": report["distribution"]["measured"],
    }
    assert report["distribution"]["measured"] == pytest.approx([S] * LAYERS, abs=1e-4)
    default = copy.deepcopy(dense)
    prune_model(default, *calibration, S, owl_lambda=0.4)  # OWL's parameters mean nothing to uniform
    theirs = decoder_linears(default)
    for full, linear in decoder_linears(model).items():
        assert torch.equal(linear.weight, theirs[full].weight), full


# ---------------------------------------------------------------- the stage and bad input


def test_prune_stage_records_the_distribution(tmp_path):
    store = Store(str(tmp_path / "store"))
    model = produce(store, model_recipe(store, "tiny-random-llama"))  # 2 layers: exactly s ± λ
    cfg = PruneConfig(distribution="angular", owl_lambda=0.1, calibration=CalibrationConfig(n_samples=2, seq_len=16))
    ref = produce(store, prune_recipe(store, model, cfg))
    summary = ref.summary
    assert summary["distribution"] == "angular" and summary["distribution_parameters"] == {"lambda": 0.1}
    assert sorted(summary["layer_sparsity_target"]) == pytest.approx([0.4, 0.6])
    assert summary["layer_sparsity"] == pytest.approx(summary["layer_sparsity_target"], abs=1e-3)
    report = json.loads(store.read_text(ref, "prune_report.json"))["report"]["distribution"]
    assert len(report["scores"]) == 2 and report["targets"] == pytest.approx(summary["layer_sparsity_target"])


def test_config_defaults_and_bad_distributions():
    cfg = PruneConfig()
    assert (cfg.distribution, cfg.owl_threshold_m, cfg.owl_lambda) == ("uniform", 5.0, 0.08)
    with pytest.raises(pydantic.ValidationError, match=r"'uniform', 'owl' or 'angular'"):
        PruneConfig(distribution="outlier")
    with pytest.raises(pydantic.ValidationError, match=r"distribution 'owl'.*N:M pattern 2:4"):
        PruneConfig(sparsity="2:4", distribution="owl")
    with pytest.raises(pydantic.ValidationError, match=r"owl_lambda 0\.3 with sparsity 0\.75.*\(0, 0\.25\)"):
        PruneConfig(sparsity="0.75", distribution="angular", owl_lambda=0.3)
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        PruneConfig(distribution="owl", owl_threshold_m=0)
    # uniform never reads λ, so a low sparsity keeps the default λ; so do the stages that do not run SparseGPT
    assert PruneConfig(sparsity="0.05").owl_lambda == 0.08
    assert PruneConfig(method="none", sparsity="2:4", distribution="owl").distribution == "owl"


def test_prune_model_refuses_bad_distributions_before_touching_weights(dense, calibration):
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"unknown sparsity distribution 'wanda'; valid: uniform, owl, angular"):
        prune_model(model, *calibration, S, distribution="wanda")
    with pytest.raises(UserError, match=r"'angular'.*2:4"):
        prune_model(model, *calibration, "2:4", distribution="angular")
    with pytest.raises(UserError, match=r"owl_lambda 0\.5 with sparsity 0\.5"):
        prune_model(model, *calibration, S, distribution="owl", owl_lambda=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
