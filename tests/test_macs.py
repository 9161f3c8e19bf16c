"""MACs per token against hand-computed counts, and the improvement factor."""

from __future__ import annotations

import pytest
import torch

from sd2_core.errors import UserError
from sd2_core.macs import average_macs_per_token, improvement_factor, macs_per_token

VOCAB = 512
# The shapes the hand counts below are written for (stated here, not inherited from the factory's defaults).
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


@pytest.fixture
def tiny(tiny_llama):
    """``tiny(**overrides)``: the shared tiny Llama in the shape the hand counts assume."""
    return lambda **overrides: tiny_llama(**{**SHAPE, **overrides})


# Per layer, head_dim 16, 2 KV heads: q 64·64 + k 64·32 + v 64·32 + o 64·64 + gate/up/down 3·64·128.
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
LM_HEAD = VOCAB * 64


def test_hand_computed_dense_count(tiny):
    m = macs_per_token(tiny(), context_len=10)
    assert m["linear"] == 2 * LAYER
    assert m["lm_head"] == LM_HEAD
    assert m["attention"] == 2 * (2 * 4 * 16 * 10)  # 2 layers × (QKᵀ + AV) × heads × head_dim × context
    assert m["total"] == 2 * LAYER + LM_HEAD + 2560
    assert m["context_len"] == 10


def test_pruned_weights_do_not_count(tiny):
    model = tiny()
    before = macs_per_token(model, 5)
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat[: flat.numel() // 2] = 0.0
    after = macs_per_token(model, 5)
    assert before["linear"] - after["linear"] == 64 * 128 // 2
    assert before["total"] - after["total"] == 64 * 128 // 2
    assert after["lm_head"] == before["lm_head"] and after["attention"] == before["attention"]
    with torch.no_grad():
        model.lm_head.weight[:100] = 0.0
    assert macs_per_token(model, 5)["lm_head"] == LM_HEAD - 100 * 64


def test_attention_grows_linearly_with_context(tiny):
    model = tiny()
    a, b, c = (macs_per_token(model, n) for n in (1, 100, 200))
    assert b["attention"] == 100 * a["attention"] and c["attention"] == 2 * b["attention"]
    assert c["total"] - b["total"] == b["attention"]  # weights do not depend on the context


def test_explicit_head_dim_and_tied_head_and_dropped_layer(tiny):
    model = tiny(head_dim=8, tie_word_embeddings=True)  # q/o project 64 ↔ 32, attention uses 4 × 8
    m = macs_per_token(model, 3)
    layer = 64 * 32 + 64 * 16 + 64 * 16 + 32 * 64 + 3 * 64 * 128
    assert m["linear"] == 2 * layer
    assert m["lm_head"] == LM_HEAD  # tied to the embedding, but still a full matmul per token
    assert m["attention"] == 2 * (2 * 4 * 8 * 3)
    del model.model.layers[1]  # a layer-pruned model: one block fewer, whatever the config still says
    m = macs_per_token(model, 3)
    assert m["linear"] == layer and m["attention"] == 2 * 4 * 8 * 3


def test_average_is_mean_over_generated_positions(tiny):
    model = tiny()
    avg = average_macs_per_token(model, prompt_len=7, new_tokens=6)
    per_token = [macs_per_token(model, n)["total"] for n in range(7, 13)]
    assert avg["total"] == pytest.approx(sum(per_token) / 6)
    assert avg["mean_context_len"] == 9.5
    assert average_macs_per_token(model, 7, 1)["total"] == macs_per_token(model, 7)["total"]


def test_bad_lengths_are_user_errors(tiny):
    model = tiny()
    with pytest.raises(UserError, match="context_len"):
        macs_per_token(model, 0)
    with pytest.raises(UserError, match="new_tokens"):
        average_macs_per_token(model, 4, 0)
    with pytest.raises(UserError, match="prompt_len"):
        average_macs_per_token(model, 0, 4)


def test_improvement_factor():
    assert improvement_factor(3.0, 5, 0.1) == pytest.approx(2.0)
    assert improvement_factor(6.0, 5, 0.0) == 6.0  # a free draft: the speed-up is MAL itself
    assert improvement_factor(1.0, 4, 1.0) == pytest.approx(0.2)  # a draft as costly as the target and never right
    with pytest.raises(UserError, match="k"):
        improvement_factor(2.0, 0, 0.1)
    with pytest.raises(UserError, match="c"):
        improvement_factor(2.0, 5, -0.1)
    with pytest.raises(UserError, match="mal"):
        improvement_factor(0.0, 5, 0.1)
