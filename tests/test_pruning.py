"""SparseGPT pruning: exact sparsity, valid N:M, pad tokens excluded, better than magnitude, damp retries.

Activations are real: a tiny seeded random Llama reads real English (the shipped C4 calibration text),
tokenized by the real SmolLM2 tokenizer when it can be built (else UTF-8 bytes). The tiny model's
vocabulary is the 511 most frequent tokens of the sample plus one "unknown" id, so held-out text shares
most of its tokens with the calibration text, as it does for a real model with a real vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sd2_core.config import PruneConfig
from sd2_core.data import embedded_path
from sd2_core.errors import UserError
from sd2_core.pruning import (
    HessianAccumulator,
    SparsitySpec,
    check_nm_width,
    decoder_linears,
    magnitude_prune,
    measure_sparsity,
    nonzero_masks,
    parse_sparsity,
    prune_model,
    sparsegpt_prune,
)

VOCAB = 512
SEQ = 64
N_CALIB = 24
N_HELD = 4
HALF, QUARTERS, TWO_FOUR = parse_sparsity("0.5"), parse_sparsity("0.75"), parse_sparsity("2:4")
# The corpus's own 512-token vocabulary; hidden 64 and 2 layers, as the shapes below assume; MLP width 256 gives
# down_proj two 128-column SparseGPT blocks; 4 KV heads make k_proj/v_proj square, 64 x 64, like q_proj.
PRUNED_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box OpenMP barriers make them ~100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(request) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids [24, 64], held-out ids [4, 64]) from different documents of real text."""
    with open(embedded_path("calibration.jsonl")) as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    try:
        tokenizer = request.getfixturevalue("smollm2_tokenizer")

        def encode(text: str) -> list[int]:
            return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    except Exception:  # no tokenizer on this machine: bytes are real text too

        def encode(text: str) -> list[int]:
            return list(text.encode()) + [0]

    calib_raw = [t for doc in docs[:40] for t in encode(doc)][: N_CALIB * SEQ]
    held_raw = [t for doc in docs[40:] for t in encode(doc)][: N_HELD * SEQ]
    assert len(calib_raw) == N_CALIB * SEQ and len(held_raw) == N_HELD * SEQ
    # the model's vocabulary is fixed before any calibration: the most frequent tokens of all the text
    rank = {tok: i for i, (tok, _) in enumerate(Counter(calib_raw + held_raw).most_common(VOCAB - 1))}
    remap = [rank.get(t, VOCAB - 1) for t in calib_raw + held_raw]
    ids = torch.tensor(remap).view(-1, SEQ)
    return ids[:N_CALIB], ids[N_CALIB:]


@pytest.fixture(scope="module")
def dense(tiny_llama) -> LlamaForCausalLM:
    return tiny_llama(**PRUNED_LLAMA)


def linear_inputs(model: nn.Module, ids: torch.Tensor, name: str, attention_mask=None) -> torch.Tensor:
    """The input rows [tokens, in_features] that Linear ``name`` sees on ``ids``."""
    rows: list[torch.Tensor] = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda _m, args, _o: rows.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add_batch(x)
    return acc.H


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖WX − ŴX‖² over the rows of x."""
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


def assert_nm(weight: torch.Tensor, n: int, m: int, name: str = "") -> None:
    zeros = (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
    assert bool((zeros == n).all()), f"{name}: groups with {sorted(set(zeros.flatten().tolist()))} zeros, want {n}"


def magnitude_pruned(model: nn.Module, spec: SparsitySpec) -> nn.Module:
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for linear in decoder_linears(pruned).values():
            linear.weight.copy_(magnitude_prune(linear.weight, spec)[0])
    return pruned


# ---------------------------------------------------------------- sparsity specs


@pytest.mark.parametrize(
    ("value", "label", "n", "m"),
    [
        (0.5, "0.5", 0, 0),
        ("0.5", "0.5", 0, 0),
        ("50%", "0.5", 0, 0),
        (" 75 % ", "0.75", 0, 0),
        (0.66, "0.66", 0, 0),
        (2 / 3, "0.6667", 0, 0),
        ("2:4", "2:4", 2, 4),
        ("1:8", "1:8", 1, 8),
        (SparsitySpec(0.5, 2, 4), "2:4", 2, 4),
    ],
)
def test_parse_sparsity_accepts(value, label, n, m):
    spec = parse_sparsity(value)
    assert (spec.label, spec.n, spec.m, spec.is_nm) == (label, n, m, m > 0)
    assert spec.fraction == pytest.approx(n / m if m else float(label), abs=1e-4)
    assert parse_sparsity(spec.label).label == label  # the label round-trips


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        1.0,
        1.5,
        -0.1,
        "0",
        "100%",
        "150%",
        "abc",
        "",
        "nan",
        "inf",
        "4:4",
        "0:4",
        "5:4",
        "2:",
        "2:4:8",
        True,
        None,
        [0.5],
    ],
)
def test_parse_sparsity_rejects(value):
    with pytest.raises(UserError) as err:
        parse_sparsity(value)
    assert repr(value) in str(err.value) and "2:4" in str(err.value)


def test_prune_config_normalises_through_parse_sparsity():
    assert PruneConfig(sparsity="50%").sparsity == "0.5"
    assert PruneConfig(sparsity=0.75).sparsity == "0.75"
    with pytest.raises(ValueError, match="3:3"):
        PruneConfig(sparsity="3:3")


def test_nm_on_a_width_not_multiple_of_m_is_refused():
    with pytest.raises(UserError, match=r"layer blk\.proj has 6 input features"):
        check_nm_width(6, TWO_FOUR, "blk.proj")
    check_nm_width(6, HALF, "blk.proj")  # unstructured has no groups
    with pytest.raises(UserError, match="6 input features"):
        sparsegpt_prune(torch.randn(3, 6), torch.eye(6), TWO_FOUR, name="blk.proj")
    with pytest.raises(UserError, match="6 input features"):
        magnitude_prune(torch.randn(3, 6), TWO_FOUR)


def test_prune_model_refuses_nm_on_an_odd_width_before_touching_weights(corpus, tiny_llama):
    model = tiny_llama(
        vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=6
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib, _ = corpus
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.down_proj has 6 input features"):
        prune_model(model, calib[:2], torch.ones_like(calib[:2]), "2:4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decoder_linears_and_bad_models(dense):
    names = set(decoder_linears(dense))
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert "model.layers.1.mlp.down_proj" in names and not any("lm_head" in n or "embed" in n for n in names)
    assert set(decoder_linears(dense.model.layers[0])) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    for bad in (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)), nn.Linear(4, 4)):
        with pytest.raises(UserError, match="model.model.layers"):
            decoder_linears(bad)
    with pytest.raises(UserError, match="model.model.layers"):
        prune_model(
            nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)),
            torch.ones(1, 4, dtype=torch.long),
            torch.ones(1, 4),
            HALF,
        )


# ---------------------------------------------------------------- Hessians


def test_hessian_is_running_average_of_2_over_n_xtx(dense, corpus):
    x = linear_inputs(dense, corpus[0], "model.layers.0.self_attn.q_proj")
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(100):  # uneven batches: the running average must still be exact
        acc.add_batch(chunk)
    expected = 2.0 / x.shape[0] * x.double().T @ x.double()
    assert acc.nsamples == x.shape[0]
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-4, atol=1e-6)


def test_pad_rows_do_not_enter_the_hessian(dense, corpus):
    name = "model.layers.1.self_attn.q_proj"  # after one attention layer: pad rows carry real, non-zero activations
    ids = corpus[0][:2].clone()
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    ids[1, 40:] = 0
    padded = HessianAccumulator(64)
    rows = linear_inputs(dense, ids, name, attention_mask=mask).view(2, SEQ, 64)
    padded.add_batch(rows, mask)

    unpadded = HessianAccumulator(64)
    unpadded.add_batch(linear_inputs(dense, ids[:1], name))
    unpadded.add_batch(linear_inputs(dense, ids[1:, :40], name))

    assert padded.nsamples == unpadded.nsamples == SEQ + 40
    torch.testing.assert_close(padded.H, unpadded.H, rtol=1e-4, atol=1e-6)
    with_pads = HessianAccumulator(64)
    with_pads.add_batch(rows)
    assert not torch.allclose(with_pads.H, unpadded.H, rtol=1e-2, atol=1e-4)  # the exclusion is what matters


def test_prune_model_ignores_what_sits_in_pad_positions(dense, corpus):
    ids = corpus[0][:4].clone()
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[3, 50:] = 0
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] * 7 + 3) % VOCAB  # different garbage in the pads
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(a, ids, mask, HALF)
    prune_model(b, other, mask, HALF)
    for name, linear in decoder_linears(a).items():
        torch.testing.assert_close(linear.weight, decoder_linears(b)[name].weight, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- SparseGPT on one layer


@pytest.fixture(scope="module")
def down_proj(dense, corpus):
    """(weight [64, 256], calibration rows, held-out rows) of layer 0's down_proj: two 128-column blocks."""
    name = "model.layers.0.mlp.down_proj"
    weight = dict(dense.named_modules())[name].weight.detach().clone()
    return weight, linear_inputs(dense, corpus[0], name), linear_inputs(dense, corpus[1], name)


@pytest.mark.parametrize("spec", [HALF, QUARTERS], ids=["0.5", "0.75"])
def test_unstructured_sparsity_is_exact_in_every_block(down_proj, spec):
    weight, x, _ = down_proj
    result = sparsegpt_prune(weight, hessian_of(x), spec, blocksize=128)
    assert result.weight.dtype == weight.dtype and result.retries == 0 and result.damp_used == 0.01
    assert torch.equal(result.weight == 0, ~result.mask)
    for start in range(0, weight.shape[1], 128):
        block = result.weight[:, start : start + 128]
        assert int((block == 0).sum()) == round(spec.fraction * block.numel())
    # SparseGPT updates the kept weights; it is not a mask on the old ones
    assert not torch.allclose(result.weight[result.mask], weight[result.mask])
    assert result.error > 0


def test_unstructured_sparsity_exact_with_a_partial_last_block(down_proj):
    weight, x, _ = down_proj
    result = sparsegpt_prune(weight, hessian_of(x), parse_sparsity(0.66), blocksize=100)  # blocks 100, 100, 56
    for start, width in ((0, 100), (100, 100), (200, 56)):
        block = result.weight[:, start : start + width]
        assert int((block == 0).sum()) == round(0.66 * 64 * width)


@pytest.mark.parametrize("blocksize", [128, 6])  # 6 is rounded down to a multiple of 4
def test_two_four_pattern_is_valid(down_proj, blocksize):
    weight, x, _ = down_proj
    result = sparsegpt_prune(weight, hessian_of(x), TWO_FOUR, blocksize=blocksize)
    assert_nm(result.weight, 2, 4)
    assert torch.equal(result.weight == 0, ~result.mask)


def test_lazy_block_updates_match_one_big_block(down_proj):
    """For N:M the mask of a group depends only on the weights updated by all earlier columns, so deferring
    the updates to block boundaries (lazy batching) must not change the result."""
    weight, x, _ = down_proj
    h = hessian_of(x)
    one_block = sparsegpt_prune(weight, h, TWO_FOUR, blocksize=256)
    for blocksize in (8, 128):
        blocked = sparsegpt_prune(weight, h, TWO_FOUR, blocksize=blocksize)
        assert torch.equal(blocked.mask, one_block.mask)
        torch.testing.assert_close(blocked.weight, one_block.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [HALF, TWO_FOUR], ids=["0.5", "2:4"])
@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"])
def test_sparsegpt_reconstructs_better_than_magnitude(dense, corpus, name, spec):
    weight = dict(dense.named_modules())[name].weight.detach()
    x, x_held = linear_inputs(dense, corpus[0], name), linear_inputs(dense, corpus[1], name)
    sgpt = sparsegpt_prune(weight, hessian_of(x), spec).weight
    mag, _ = magnitude_prune(weight, spec)
    assert int((sgpt == 0).sum()) == int((mag == 0).sum())  # same sparsity, fair comparison
    assert output_error(x, weight, sgpt) < output_error(x, weight, mag)
    assert output_error(x_held, weight, sgpt) < output_error(x_held, weight, mag)


def test_magnitude_prune_baseline():
    w = torch.tensor([[4.0, -1.0, 3.0, 2.0, -0.5, 0.1, 7.0, -6.0]])
    pruned, keep = magnitude_prune(w, TWO_FOUR)
    assert pruned.tolist() == [[4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 7.0, -6.0]]
    assert torch.equal(keep, pruned != 0)
    pruned, _ = magnitude_prune(w, parse_sparsity(0.75))
    assert pruned.tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, -6.0]]


def test_dead_inputs_are_pruned_without_failing(down_proj):
    weight, x, _ = down_proj
    x = x.clone()
    x[:, [3, 130]] = 0.0  # two inputs that never fire
    result = sparsegpt_prune(weight, hessian_of(x), HALF)
    assert result.retries == 0
    assert bool((result.weight[:, [3, 130]] == 0).all())
    assert int((result.weight == 0).sum()) == weight.numel() // 2


# ---------------------------------------------------------------- dampening retries


def indefinite_hessian(n: int = 64) -> torch.Tensor:
    """Symmetric H with eigenvalues in [1, 2] but one at −0.03 (−2 % of mean(diag H) ≈ 1.49): Cholesky fails
    until the damp exceeds that."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    eig[0] = -0.03
    return (q @ torch.diag(eig) @ q.T).float()


def test_failed_cholesky_retries_with_more_damping(caplog):
    h = indefinite_hessian()
    assert torch.linalg.eigvalsh(h.double()).min() < -0.01 * h.diagonal().mean()
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="sd2_core.pruning.sparsegpt"):
        result = sparsegpt_prune(weight, h, HALF, percdamp=1e-4, name="model.layers.7.mlp.up_proj")
    # 1e-4, 1e-3 and 1e-2 of mean(diag) cannot lift a −2 % eigenvalue; 1e-1 can
    assert result.retries == 3
    assert result.damp_used == pytest.approx(0.1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("model.layers.7.mlp.up_proj" in w for w in warnings)
    assert "0.0001" in warnings[0] and "0.01" in warnings[2]
    assert int((result.weight == 0).sum()) == weight.numel() // 2 and torch.isfinite(result.weight).all()


def test_exhausted_retries_raise_instead_of_falling_back():
    with pytest.raises(RuntimeError, match=r"model\.layers\.7\.mlp\.up_proj.*2 retries"):
        sparsegpt_prune(
            torch.randn(8, 64),
            indefinite_hessian(),
            HALF,
            percdamp=1e-4,
            max_retries=2,
            name="model.layers.7.mlp.up_proj",
        )
    h = torch.eye(64)
    h[5, 5] = math.nan
    with pytest.raises(RuntimeError, match="NaN"):
        sparsegpt_prune(torch.randn(8, 64), h, HALF)


# ---------------------------------------------------------------- the whole model


def padded_calibration(corpus) -> tuple[torch.Tensor, torch.Tensor]:
    ids = corpus[0].clone()
    mask = torch.ones_like(ids)
    mask[2, 40:] = 0  # right padding, as the calibration loader produces
    mask[5, 50:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def pruned_half(dense, corpus):
    model = copy.deepcopy(dense)
    calls: list[tuple[int, int, str]] = []
    report = prune_model(model, *padded_calibration(corpus), HALF, progress=lambda d, t, m: calls.append((d, t, m)))
    return model, report, calls


def test_prune_model_exact_sparsity_and_report(dense, pruned_half):
    model, report, calls = pruned_half
    assert report["spec"] == "0.5" and report["overall_sparsity"] == pytest.approx(0.5)
    assert set(report["per_module"]) == set(decoder_linears(model))
    for name, linear in decoder_linears(model).items():
        numel = linear.weight.numel()
        assert abs(int((linear.weight == 0).sum()) - 0.5 * numel) <= 1, name
        assert report["per_module"][name]["retries"] == 0 and report["per_module"][name]["error"] > 0
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]
    json.dumps(report)  # the report is stored as JSON


def test_layers_are_pruned_sequentially_on_pruned_inputs(dense, corpus, pruned_half):
    """Layer 1 must be pruned on what it sees behind the *pruned* layer 0, not behind the dense one."""
    model, _, _ = pruned_half
    ids, mask = padded_calibration(corpus)
    name = "model.layers.1.mlp.up_proj"
    dense_weight = dict(dense.named_modules())[name].weight.detach()
    behind_pruned = copy.deepcopy(dense)
    behind_pruned.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    for source, should_match in ((behind_pruned, True), (dense, False)):
        acc = HessianAccumulator(64)
        acc.add_batch(linear_inputs(source, ids, name, attention_mask=mask).view(*ids.shape, 64), mask)
        expected = sparsegpt_prune(dense_weight, acc.H, HALF).weight
        got = dict(model.named_modules())[name].weight.detach()
        relative = float((got - expected).norm() / got.norm())
        if should_match:
            assert torch.equal(got == 0, expected == 0) and relative < 1e-4
        else:
            assert relative > 1e-2


def test_prune_model_leaves_everything_else_alone(dense, pruned_half):
    model, _, _ = pruned_half
    linears = {f"{n}.weight" for n in decoder_linears(model)}
    dense_state = dense.state_dict()
    for key, value in model.state_dict().items():
        if key not in linears:
            assert torch.equal(value, dense_state[key]), key
    assert not model.training


def test_measure_sparsity_and_masks(dense, pruned_half):
    model, _, _ = pruned_half
    stats = measure_sparsity(model)
    decoder_total = sum(m.weight.numel() for m in decoder_linears(model).values())
    assert stats["overall"] == pytest.approx(0.5)
    assert stats["total_params"] == sum(p.numel() for p in dense.parameters())
    assert stats["nonzero_params"] == stats["total_params"] - decoder_total // 2
    assert measure_sparsity(dense)["overall"] == 0.0
    masks = nonzero_masks(model)
    assert set(masks) == set(decoder_linears(model))
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and torch.equal(mask, decoder_linears(model)[name].weight != 0)


@pytest.mark.parametrize("spec", [HALF, TWO_FOUR], ids=["0.5", "2:4"])
def test_pruned_model_is_closer_to_dense_than_magnitude_on_held_out_text(dense, corpus, spec):
    sgpt = copy.deepcopy(dense)
    prune_model(sgpt, *padded_calibration(corpus), spec)
    mag = magnitude_pruned(dense, spec)
    held = corpus[1]
    with torch.no_grad():
        reference = dense(held).logits
        sgpt_logits, mag_logits = sgpt(held).logits, mag(held).logits
    assert torch.isfinite(sgpt_logits).all()
    assert float(((sgpt_logits - reference) ** 2).mean()) < float(((mag_logits - reference) ** 2).mean())
    if spec.is_nm:
        for name, linear in decoder_linears(sgpt).items():
            assert_nm(linear.weight, 2, 4, name)


def test_prune_model_in_bfloat16(dense, corpus):
    model = copy.deepcopy(dense).to(torch.bfloat16)
    report = prune_model(model, *padded_calibration(corpus), TWO_FOUR)
    assert report["overall_sparsity"] == 0.5
    for name, linear in decoder_linears(model).items():
        assert linear.weight.dtype == torch.bfloat16
        assert_nm(linear.weight, 2, 4, name)
    with torch.no_grad():
        assert torch.isfinite(model(corpus[1]).logits).all()


@pytest.mark.parametrize("spec", [HALF, TWO_FOUR], ids=["0.5", "2:4"])
def test_shared_hessians_give_the_result_of_separate_ones(dense, corpus, spec):
    """q/k/v (and gate/up) read one input: one Hessian and one inverse for the group, the same pruning."""
    shared, separate = copy.deepcopy(dense), copy.deepcopy(dense)
    report = prune_model(shared, *padded_calibration(corpus), spec)
    alone = prune_model(separate, *padded_calibration(corpus), spec, share_hessians=False)
    assert report["shared_hessians"] == [
        f"model.layers.{i}.{group}"
        for i in range(2)
        for group in ("self_attn.q_proj/self_attn.k_proj/self_attn.v_proj", "mlp.gate_proj/mlp.up_proj")
    ]
    assert alone["shared_hessians"] == []
    theirs = decoder_linears(separate)
    for name, linear in decoder_linears(shared).items():
        assert torch.equal(linear.weight == 0, theirs[name].weight == 0), f"{name}: another mask"
        torch.testing.assert_close(linear.weight, theirs[name].weight, rtol=1e-5, atol=1e-6)
        assert report["per_module"][name]["damp_used"] == alone["per_module"][name]["damp_used"]


def test_naming_the_device_the_model_is_on_changes_nothing(dense, corpus):
    here, named = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(here, *padded_calibration(corpus), HALF)
    prune_model(named, *padded_calibration(corpus), HALF, device="cpu")
    theirs = decoder_linears(named)
    for name, linear in decoder_linears(here).items():
        assert torch.equal(linear.weight, theirs[name].weight), name
