"""WikiText-2 perplexity: the sliding-window arithmetic checked against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from sd2_core.artifacts import produce
from sd2_core.config import PerplexityConfig
from sd2_core.errors import UserError
from sd2_core.models import model_recipe
from sd2_core.perplexity import perplexity, perplexity_recipe, text_token_ids, wikitext_path
from sd2_core.store import Store


def _direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ids[1:] given everything before them in one forward (no windows)."""
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")


def test_one_window_equals_the_direct_computation(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, context_len=64, stride=64)
    direct = _direct_nll(model, ids)
    assert result["tokens_scored"] == 39 and result["windows"] == 1
    assert result["perplexity"] == pytest.approx(math.exp(float(direct.mean())), rel=1e-5)


def test_disjoint_windows_score_all_but_each_windows_first_token(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, context_len=20, stride=20)
    parts = [_direct_nll(model, ids[s : s + 20]) for s in (0, 20, 40)]
    expected = torch.cat(parts)
    assert result["windows"] == 3 and result["tokens_scored"] == 19 + 19 + 9
    assert result["nll_per_token"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_overlapping_windows_score_each_token_once_with_more_context(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(2))
    result = perplexity(model, ids, context_len=16, stride=8)
    assert result["tokens_scored"] == 29  # every token after the first, exactly once
    # token 20 is scored in the window starting at 8 with 12 tokens of context
    window = _direct_nll(model, ids[8:24])
    first = _direct_nll(model, ids[0:16])
    second_new = window[16 - 8 - 1 :]  # positions 16..23 of the text
    third = _direct_nll(model, ids[16:30])[24 - 16 - 1 :]
    expected = torch.cat([first, second_new, third])
    assert result["nll_per_token"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_shipped_text_is_the_wikitext2_test_split(smollm2_tokenizer):
    path = wikitext_path("embedded")
    text = path.read_text(encoding="utf-8")
    assert text.startswith(" = Robert Boulter = ") and len(text.splitlines()) == 2891
    ids = text_token_ids(smollm2_tokenizer, text, max_tokens=100)
    assert ids.shape == (100,)


def test_recipe_and_bad_input(tmp_path, smollm2_tokenizer):
    store = Store(str(tmp_path / "store"))
    model = produce(store, model_recipe(store, "tiny-random-llama"))
    cfg = PerplexityConfig(context_len=32, stride=16, max_tokens=100)
    ref = produce(store, perplexity_recipe(store, model, cfg))
    assert ref.summary["tokens_scored"] == 99 and ref.summary["perplexity"] > 1
    with pytest.raises(ValueError, match="stride 64 is longer than context_len 32"):
        PerplexityConfig(context_len=32, stride=64)
    with pytest.raises(UserError, match="not a file"):
        wikitext_path(str(tmp_path / "missing.txt"))
