"""Greedy speculative decoding with top-1 verification (batch size 1, HF causal LMs, KV caches).

Why written here rather than taken from `model.generate(assistant_model=...)`: MAL needs the exact count of
tokens appended at every verification step, the draft length k must stay fixed (HF adapts it), and the
output must be compared token for token with the target's own greedy decoding.

One verification step = one target forward. A `Drafter` proposes k tokens, the target scores the uncached
part of the sequence plus those k tokens at once, the longest prefix of drafts equal to the target's argmax is
accepted, and one target token follows (the correction at the first mismatch, or the bonus token when all k
match). Proposal and verification meet only at `Drafter.propose(committed sequence, k)`, as transformers
separates its candidate generators from verification: a drafter with another vocabulary is a new class, not a
branch in this loop. Caches hold a prefix of the committed sequence and are cropped back after rejections.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from sd2_core.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SpecResult:
    """What one speculative generation produced and how many verification steps it took.

    appended_per_step counts the tokens kept at each step after truncation at EOS / max_new_tokens, so
    sum(appended_per_step) == len(tokens); accepted_per_step is the verification outcome (draft tokens equal
    to the target's argmax, 0..k) before truncation, which is what the acceptance histogram shows.
    """

    tokens: list[int]
    steps: int
    appended_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)


def _check(input_ids: list[int], max_new_tokens: int) -> None:
    if not input_ids:
        raise UserError("input_ids is empty; generation needs at least one prompt token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


class _Cached:
    """A model with its KV cache over a prefix of the sequence: feed the rest, crop back after rejections."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def feed(self, tokens: list[int], keep: int) -> torch.Tensor:
        """Run `tokens` after the cached prefix; argmax ids of the last `keep` positions (1-D tensor on CPU)."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0, -keep:].argmax(dim=-1).cpu()

    def crop_to(self, length: int) -> None:
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many trailing positions


class Drafter(Protocol):
    """Anything that proposes the next k tokens, in the target's vocabulary, after a committed sequence."""

    def propose(self, sequence: list[int], k: int) -> list[int]: ...


class ModelDrafter:
    """A draft model with the target's vocabulary, proposing greedily from its own KV cache.

    The cache is kept over the longest prefix it shares with each newly committed sequence, so after a
    rejection only the corrected tail is fed again.
    """

    def __init__(self, model):
        self._runner = _Cached(model)
        self._cached: list[int] = []  # the tokens whose keys/values the cache holds

    def propose(self, sequence: list[int], k: int) -> list[int]:
        shared = 0
        for mine, theirs in zip(self._cached, sequence, strict=False):
            if mine != theirs:
                break
            shared += 1
        self._runner.crop_to(shared)
        # The first forward catches the cache up with the committed sequence (after a full acceptance this
        # includes the drafter's own last proposal, which it never fed), then one token each; the k-th
        # proposal is never fed.
        pending = sequence[shared:]
        proposals: list[int] = []
        for _ in range(k):
            token = int(self._runner.feed(pending, 1)[0])
            proposals.append(token)
            pending = [token]
        self._cached = sequence + proposals[:-1]
        return proposals


def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos_token_ids: Iterable[int]) -> list[int]:
    """The target's own greedy decoding, one token per forward: the reference speculative output must equal.

    Returns the new tokens only; an EOS token is included when produced and ends the generation.
    """
    _check(input_ids, max_new_tokens)
    eos = set(eos_token_ids)
    runner = _Cached(model)
    out: list[int] = []
    pending = list(input_ids)
    with torch.inference_mode():
        while len(out) < max_new_tokens:
            token = int(runner.feed(pending, 1)[0])
            out.append(token)
            if token in eos:
                break
            pending = [token]
    return out


def _kept(candidates: list[int], room: int, eos: set[int]) -> tuple[list[int], bool]:
    """Candidates kept after truncation at the first EOS (inclusive) and at `room` tokens; whether EOS ended it."""
    kept: list[int] = []
    for token in candidates[:room]:
        kept.append(token)
        if token in eos:
            return kept, True
    return kept, False


def speculative_generate(
    target, drafter: Drafter, input_ids: list[int], k: int, max_new_tokens: int, eos_token_ids: Iterable[int]
) -> SpecResult:
    """Greedy speculative decoding with k drafted tokens per step; lossless when the numerics agree.

    Always k drafts per step, even near the end: truncation afterwards keeps the same tokens a shorter draft
    would have produced.
    """
    _check(input_ids, max_new_tokens)
    if k < 1:
        raise UserError(f"k (draft tokens per step) must be at least 1, got {k}")
    eos = set(eos_token_ids)
    tgt = _Cached(target)
    seq = list(input_ids)
    prompt_len = len(seq)
    result = SpecResult(tokens=[], steps=0)
    with torch.inference_mode():
        while True:
            base = len(seq)
            proposals = drafter.propose(seq, k)
            if len(proposals) != k:
                raise RuntimeError(f"{type(drafter).__name__} proposed {len(proposals)} tokens, {k} were asked for")
            # Verify: the target scores its uncached tail plus the proposals in one forward. Position i of the
            # last k+1 logits is the target's choice after seq + proposals[:i].
            choices = tgt.feed(seq[tgt.length :] + proposals, k + 1).tolist()
            accepted = 0
            while accepted < k and proposals[accepted] == choices[accepted]:
                accepted += 1
            kept, hit_eos = _kept(proposals[:accepted] + [choices[accepted]], max_new_tokens - len(result.tokens), eos)
            seq.extend(kept)
            result.tokens.extend(kept)
            result.steps += 1
            result.appended_per_step.append(len(kept))
            result.accepted_per_step.append(accepted)
            if hit_eos or len(result.tokens) >= max_new_tokens:
                break
            # Keep only cache entries of committed tokens: the target holds base + k positions, of which
            # base + accepted are committed (its correction/bonus token is fed next step).
            tgt.crop_to(base + accepted)
    log.debug("speculative: %d prompt tokens, %d new tokens in %d steps", prompt_len, len(result.tokens), result.steps)
    return result
