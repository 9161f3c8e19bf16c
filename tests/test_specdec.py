"""Greedy speculative decoding and MAL on tiny random float64 Llamas (float64: argmax ties cannot flip)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from sd2_core.errors import UserError
from sd2_core.mal import PromptItem, chat_input_ids, greedy_reference, measure_mal
from sd2_core.specdec import (
    ModelDrafter,
    greedy_generate,
    greedy_generate_batch,
    speculative_generate,
    speculative_generate_batch,
)

VOCAB = 512
NEVER = {-1}  # an EOS id no model can emit: generation runs to max_new_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds contention (100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def float64_llama(make, seed: int, **overrides) -> LlamaForCausalLM:
    """The shared tiny Llama in float64, so greedy argmax ties cannot flip between two decoders."""
    return make(seed, **overrides).to(torch.float64)


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with the target often but not always (every acceptance length 0..k occurs)."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return draft


def prompt(seed: int, length: int = 12) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def target(tiny_llama):
    return float64_llama(tiny_llama, 0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def close_draft(target):
    return perturbed(target, 0.003, seed=1)


def reference_speculative(target, draft, ids: list[int], k: int, max_new: int) -> tuple[list[int], list[int]]:
    """Cache-free speculative decoding (full forwards every time): the accepted counts the cached one must match."""

    def argmax_after(model, seq: list[int], n: int) -> list[int]:
        logits = model(input_ids=torch.tensor([seq])).logits[0]
        return logits[-n:].argmax(-1).tolist()

    seq, out, accepted_log = list(ids), [], []
    with torch.inference_mode():
        while len(out) < max_new:
            proposals: list[int] = []
            for _ in range(k):
                proposals += argmax_after(draft, seq + proposals, 1)
            choices = argmax_after(target, seq + proposals, k + 1)
            n = 0
            while n < k and proposals[n] == choices[n]:
                n += 1
            new = (proposals[:n] + [choices[n]])[: max_new - len(out)]
            seq += new
            out += new
            accepted_log.append(n)
    return out, accepted_log


def test_self_draft_accepts_everything(target):
    """Draft == target: every step appends k+1 tokens, so MAL is exactly k+1 (the draft cache must catch up on
    its own last proposal after each full acceptance, or the next proposals would go wrong)."""
    for k in (1, 3, 5):
        ids = prompt(k)
        greedy = greedy_generate(target, ids, 4 * (k + 1), NEVER)
        res = speculative_generate(target, ModelDrafter(target), ids, k, 4 * (k + 1), NEVER)
        assert res.tokens == greedy
        assert res.steps == 4
        assert res.appended_per_step == [k + 1] * 4
        assert res.accepted_per_step == [k] * 4
        assert len(res.tokens) / res.steps == k + 1


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_close_draft_is_lossless_with_partial_acceptance(target, close_draft, k):
    seen: set[int] = set()
    for s in range(3):
        ids = prompt(10 + s)
        greedy = greedy_generate(target, ids, 30, NEVER)
        res = speculative_generate(target, ModelDrafter(close_draft), ids, k, 30, NEVER)
        assert res.tokens == greedy
        assert sum(res.appended_per_step) == len(res.tokens) == 30
        assert res.steps == len(res.appended_per_step) == len(res.accepted_per_step)
        assert 1 <= len(res.tokens) / res.steps <= k + 1
        assert all(1 <= a <= k + 1 for a in res.appended_per_step)
        seen.update(res.accepted_per_step)
    assert 0 in seen and len(seen) > 1, f"the draft should be rejected sometimes and accepted sometimes, saw {seen}"


@pytest.mark.parametrize("k", [2, 5])
def test_cached_acceptance_matches_cache_free_reference(target, close_draft, k):
    """Cache cropping cannot hide behind losslessness (the target alone decides the tokens): the number of
    accepted drafts per step must equal a decoder that recomputes everything from scratch."""
    for s in range(2):
        ids = prompt(20 + s)
        res = speculative_generate(target, ModelDrafter(close_draft), ids, k, 25, NEVER)
        tokens, accepted = reference_speculative(target, close_draft, ids, k, 25)
        assert res.tokens == tokens
        assert res.accepted_per_step == accepted


def test_unrelated_draft_is_lossless(target, tiny_llama):
    other = float64_llama(tiny_llama, 7, vocab_size=VOCAB)
    for k in (1, 5):
        ids = prompt(30 + k)
        res = speculative_generate(target, ModelDrafter(other), ids, k, 20, NEVER)
        assert res.tokens == greedy_generate(target, ids, 20, NEVER)
        assert 1 <= len(res.tokens) / res.steps <= k + 1


def test_truncation_at_max_new_tokens_counts_only_kept_tokens(target):
    """With the target as its own draft and 10 tokens at k=3: steps append 4, 4, then only the 2 that fit."""
    res = speculative_generate(target, ModelDrafter(target), prompt(40), 3, 10, NEVER)
    assert res.appended_per_step == [4, 4, 2]
    assert res.tokens == greedy_generate(target, prompt(40), 10, NEVER)


def test_truncation_at_eos(target, close_draft):
    ids = prompt(50)
    free = greedy_generate(target, ids, 30, NEVER)
    position = 13
    eos = free[position]
    stop = free.index(eos)  # its first occurrence ends the generation
    greedy = greedy_generate(target, ids, 30, {eos})
    assert greedy == free[: stop + 1]
    for draft in (target, close_draft):
        for k in (2, 5):
            res = speculative_generate(target, ModelDrafter(draft), ids, k, 30, {eos})
            assert res.tokens == greedy
            assert res.tokens[-1] == eos and eos not in res.tokens[:-1]
            assert sum(res.appended_per_step) == len(greedy)


@pytest.mark.parametrize("lengths", [(3, 17, 9, 30, 1), (14, 15, 16, 13)], ids=["prefill-apart", "prefill-padded"])
def test_batched_decoding_equals_one_sequence_at_a_time(target, close_draft, lengths):
    """Rows of different lengths, finishing at different steps (EOS or max_new_tokens), with different acceptance:
    each row's tokens, step count and acceptance log equal what it gets decoded alone. Very different prompt
    lengths take the row-by-row first feed, similar ones one padded forward: both layouts are checked."""
    prompts = [prompt(60 + i, length) for i, length in enumerate(lengths)]
    alone = [greedy_generate(target, ids, 24, NEVER) for ids in prompts]
    eos = {alone[1][5], alone[3][11]}  # rows 1 and 3 end early, the others at max_new_tokens
    alone = [greedy_generate(target, ids, 24, eos) for ids in prompts]
    assert len({len(a) for a in alone}) > 1
    assert greedy_generate_batch(target, prompts, 24, eos) == alone
    for draft in (target, close_draft):
        for k in (1, 4):
            batched = speculative_generate_batch(target, ModelDrafter(draft), prompts, k, 24, eos)
            for ids, res, expected in zip(prompts, batched, alone, strict=True):
                single = speculative_generate(target, ModelDrafter(draft), ids, k, 24, eos)
                assert res.tokens == expected == single.tokens
                assert (res.steps, res.accepted_per_step) == (single.steps, single.accepted_per_step)
    accepted = {
        n
        for res in speculative_generate_batch(target, ModelDrafter(close_draft), prompts, 4, 24, eos)
        for n in res.accepted_per_step
    }
    assert len(accepted) > 2  # the rows really diverged inside one batch


def test_bad_arguments_are_user_errors(target):
    with pytest.raises(UserError, match="k"):
        speculative_generate(target, ModelDrafter(target), [1, 2], 0, 5, NEVER)
    with pytest.raises(UserError, match="max_new_tokens"):
        speculative_generate(target, ModelDrafter(target), [1, 2], 2, 0, NEVER)
    with pytest.raises(UserError, match="empty"):
        greedy_generate(target, [], 5, NEVER)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        greedy_generate_batch(target, [[1], []], 5, NEVER)
    with pytest.raises(UserError, match="no prompts"):
        speculative_generate_batch(target, ModelDrafter(target), [], 2, 5, NEVER)


# --- MAL over chat prompts, with the real SmolLM2 tokenizer and its chat template -------------------------------


@pytest.fixture(scope="module")
def chat_target(tiny_llama):
    return float64_llama(tiny_llama, 0)  # the factory's default vocabulary is the SmolLM2 tokenizer's


@pytest.fixture(scope="module")
def chat_draft(chat_target):
    return perturbed(chat_target, 0.003, seed=2)


PROMPTS = [
    PromptItem(id="a1", category="qa", turns=["What is the capital of France?"]),
    PromptItem(id="a2", category="qa", turns=["Name three primary colours."]),
    PromptItem(id="m1", category="mt_bench", turns=["Write a haiku about rain.", "Now make it about snow."]),
]


def test_greedy_reference_continues_with_the_targets_answer(chat_target, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ref = greedy_reference(chat_target, tok, PROMPTS, 6)
    assert sorted(ref) == ["a1", "a2", "m1"]
    assert [len(ref[p.id]) for p in PROMPTS] == [1, 1, 2]
    eos = {tok.eos_token_id}
    question = {"role": "user", "content": PROMPTS[2].turns[0]}
    first = greedy_generate(chat_target, chat_input_ids(tok, [question]), 6, eos)
    assert ref["m1"][0] == first
    answer = tok.decode([t for t in first if t not in eos], skip_special_tokens=True).strip()
    history = [
        question,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": PROMPTS[2].turns[1]},
    ]
    assert ref["m1"][1] == greedy_generate(chat_target, chat_input_ids(tok, history), 6, eos)


def test_measure_mal_pools_counts_and_checks_losslessness(chat_target, chat_draft, smollm2_tokenizer):
    k, max_new = 3, 12
    calls: list[tuple[int, int, str]] = []
    result = measure_mal(
        chat_target, chat_draft, smollm2_tokenizer, PROMPTS, k, max_new, progress=lambda *a: calls.append(a)
    )
    rows = result["per_prompt"]
    assert [(r["id"], r["turn"]) for r in rows] == [("a1", 1), ("a2", 1), ("m1", 1), ("m1", 2)]
    assert result["lossless"] == {"identical": 4, "total": 4}
    assert result["tokens"] == sum(r["tokens"] for r in rows)
    assert result["steps"] == sum(r["steps"] for r in rows) == sum(result["acceptance_histogram"])
    assert len(result["acceptance_histogram"]) == k + 1
    assert result["mal"] == pytest.approx(result["tokens"] / result["steps"])  # pooled, not a mean of ratios
    assert 1 <= result["mal"] <= k + 1
    for cat in ("qa", "mt_bench"):
        mine = [r for r in rows if r["category"] == cat]
        expected = sum(r["tokens"] for r in mine) / sum(r["steps"] for r in mine)
        assert result["mal_per_category"][cat] == pytest.approx(expected)
        assert 1 <= result["mal_per_category"][cat] <= k + 1
    assert result["seconds"] > 0 and result["tokens_per_second"] > 0
    assert calls[-1][:2] == (4, 4)  # reference (4 sequences) then speculative (4 sequences)


def test_measure_mal_self_draft_and_reference_reuse(chat_target, smollm2_tokenizer):
    k, max_new = 2, 9  # no EOS from this random model in 9 tokens: every step appends k+1
    ref = greedy_reference(chat_target, smollm2_tokenizer, PROMPTS, max_new)
    assert all(smollm2_tokenizer.eos_token_id not in seq for turns in ref.values() for seq in turns)
    result = measure_mal(chat_target, chat_target, smollm2_tokenizer, PROMPTS, k, max_new, reference=ref)
    assert result["mal"] == k + 1
    assert result["acceptance_histogram"] == [0, 0, result["steps"]]
    assert result["lossless"] == {"identical": 4, "total": 4}
    # The lossless check compares against the given reference: a wrong reference sequence is counted as different.
    broken = {key: [list(seq) for seq in turns] for key, turns in ref.items()}
    broken["a2"][0][-1] = (broken["a2"][0][-1] + 1) % len(smollm2_tokenizer)
    again = measure_mal(chat_target, chat_target, smollm2_tokenizer, PROMPTS[:2], k, max_new, reference=broken)
    assert again["lossless"] == {"identical": 1, "total": 2}
    assert [r["identical"] for r in again["per_prompt"]] == [True, False]


def test_measure_mal_rejects_bad_input(chat_target, smollm2_tokenizer):
    with pytest.raises(UserError, match="reference lacks prompt 'm1'"):
        measure_mal(chat_target, chat_target, smollm2_tokenizer, PROMPTS, 2, 4, reference={"a1": [[1]], "a2": [[1]]})
    with pytest.raises(UserError, match="unique"):
        measure_mal(chat_target, chat_target, smollm2_tokenizer, [PROMPTS[0], PROMPTS[0]], 2, 4)
    with pytest.raises(UserError, match="k"):
        measure_mal(chat_target, chat_target, smollm2_tokenizer, PROMPTS, 0, 4, reference={})


@pytest.mark.parametrize("batch_size", [2, 3])
def test_measure_mal_in_batches_equals_one_at_a_time(chat_target, chat_draft, smollm2_tokenizer, batch_size):
    k, max_new = 3, 12
    ref = greedy_reference(chat_target, smollm2_tokenizer, PROMPTS, max_new)
    assert greedy_reference(chat_target, smollm2_tokenizer, PROMPTS, max_new, batch_size=batch_size) == ref
    one = measure_mal(chat_target, chat_draft, smollm2_tokenizer, PROMPTS, k, max_new, reference=ref)
    many = measure_mal(
        chat_target, chat_draft, smollm2_tokenizer, PROMPTS, k, max_new, reference=ref, batch_size=batch_size
    )
    for key in ("mal", "mal_per_category", "steps", "tokens", "lossless", "acceptance_histogram", "per_prompt"):
        assert many[key] == one[key], key
    with pytest.raises(UserError, match="batch_size must be at least 1, got 0"):
        measure_mal(chat_target, chat_draft, smollm2_tokenizer, PROMPTS, k, max_new, reference=ref, batch_size=0)
