"""Layer pruning: the block group with the smallest angular distance is found and dropped, and the rest still runs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from sd2_core.errors import UserError
from sd2_core.pruning.layer_pruner import angular_distances, blocks_to_drop, drop_blocks, prune_layers, residual_states

VOCAB = 96


@pytest.fixture
def llama(tiny_llama):
    """``llama(layers)``: the shared tiny Llama, narrower (hidden 32) and as deep as a test needs."""
    return lambda layers: tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers)


def _make_identity(model: LlamaForCausalLM, blocks: range) -> None:
    """A block whose attention output and MLP output projections are zero adds nothing to the residual stream."""
    with torch.no_grad():
        for i in blocks:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


def _calibration(n: int = 6, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, length))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding: the last real token is earlier
    mask[1, :4] = 0  # left padding
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("start", [0, 2, 4])
def test_identity_blocks_are_the_ones_dropped(llama, start: int) -> None:
    model = llama(8)
    _make_identity(model, range(start, start + 4))
    ids, mask = _calibration()
    states = residual_states(model, ids, mask)
    assert states.shape == (9, 6, 32)
    distances = angular_distances(states, 4)
    assert distances.shape == (5,)
    assert distances[start] < 1e-6  # input of block `start` == input of block `start + 4`
    assert all(distances[i] > 1e-3 for i in range(5) if i != start)

    pruned, report = prune_layers(model, ids, mask, 0.5)
    assert report["dropped"] == list(range(start, start + 4))
    assert len(pruned.model.layers) == 4 and pruned.config.num_hidden_layers == 4
    # Dropping exact identities changes nothing: same logits on every real token.
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        after = pruned(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(before[real], after[real], atol=1e-5)


def test_last_group_uses_last_block_output_not_final_norm(llama) -> None:
    """With the last blocks identities, the group that ends at the model's output is the one found."""
    model = llama(6)
    _make_identity(model, range(3, 6))
    with torch.no_grad():  # a final norm that is not a uniform scale would hide the identity from post-norm states
        model.model.norm.weight.uniform_(0.2, 3.0)
    ids, mask = _calibration()
    _, report = prune_layers(model, ids, mask, 0.5)
    assert report["dropped"] == [3, 4, 5]


def test_pruned_model_generates_and_keeps_weights(llama) -> None:
    model = llama(6)
    pruned = drop_blocks(model, 1, 2)
    kept = [0, 3, 4, 5]
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)
        assert pruned.model.layers[new].self_attn.layer_idx == new
    out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_bad_fractions_are_clear_errors(llama) -> None:
    assert blocks_to_drop(30, 0.5) == 15 and blocks_to_drop(2, 0.5) == 1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="out of range"):
            blocks_to_drop(8, bad)
    with pytest.raises(UserError, match="would leave none"):
        blocks_to_drop(2, 0.9)
    with pytest.raises(UserError, match="all padding"):
        residual_states(llama(2), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
