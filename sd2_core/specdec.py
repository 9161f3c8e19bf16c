"""Greedy speculative decoding with top-1 verification over a batch of sequences (HF causal LMs, KV caches).

Why written here rather than taken from `model.generate(assistant_model=...)`: MAL needs the exact count of
tokens appended at every verification step, the draft length k must stay fixed (HF adapts it), the output must
be compared token for token with the target's own greedy decoding, and HF's assisted generation takes one
sequence at a time. On a CPU a small model's forward is bound by reading its weights, so a forward over B rows
costs little more than over one: batching is where the speed is.

One verification step = one target forward over every live row. A `Drafter` proposes k tokens per row, the
target scores each row's uncached part plus its k tokens at once, the longest prefix of drafts equal to the
target's argmax is accepted, and one target token follows (the correction at the first mismatch, or the bonus
token when all k match). Each row keeps its own acceptance; a finished row leaves the batch. Proposal and
verification meet only at `Drafter.propose(committed sequences, k)`, as transformers separates its candidate
generators from verification: a drafter with another vocabulary is a new class, not a branch in this loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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


def _check(prompts: Sequence[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise UserError("no prompts given; generation needs at least one sequence")
    for i, ids in enumerate(prompts):
        if not ids:
            raise UserError(f"prompt {i} is empty; generation needs at least one prompt token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


# A first feed whose padding would make the batch compute more than this many times its real tokens is run
# row by row instead (see _Rows._prefill_apart).
_PREFILL_WASTE = 1.25


class _Rows:
    """Rows of sequences in one KV cache, each row advancing by its own amount.

    Row r's cache holds a prefix of its sequence at increasing cache columns; every other column of that row
    (left padding, a shorter row's filler, a rejected draft) is a hole, masked out of attention, so no cached key
    ever moves. RoPE positions count a row's own tokens only, so each row sees exactly what it would alone.
    """

    def __init__(self, model, rows: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros((rows, 0), dtype=torch.long)  # 1 where the column holds a token of the row
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # what each row's cache holds, in order
        self.columns: list[list[int]] = [[] for _ in range(rows)]  # the cache column of each of those tokens

    def crop(self, row: int, length: int) -> None:
        """Forget all but the first `length` cached tokens of `row` (their columns become holes)."""
        dropped = self.columns[row][length:]
        if dropped:
            self.mask[row, dropped] = 0
        del self.tokens[row][length:]
        del self.columns[row][length:]

    def held_prefix(self, row: int, sequence: list[int]) -> int:
        """Crop `row` to the longest prefix it shares with `sequence`, leaving at least one token to feed."""
        held = self.tokens[row]
        shared = 0
        for mine, theirs in zip(held, sequence, strict=False):
            if mine != theirs:
                break
            shared += 1
        shared = min(shared, len(sequence) - 1)
        self.crop(row, shared)
        return shared

    def feed(self, pending: list[list[int]], keep: int) -> torch.Tensor:
        """Run each row's pending tokens after its cached prefix; argmax ids of each row's last `keep` (rows × keep).

        Rows are right-aligned (shorter ones padded on the left with holes), so the last `keep` logits are
        every row's own last tokens as long as each row feeds at least `keep`.
        """
        width = max(len(p) for p in pending)
        if min(len(p) for p in pending) < keep:
            raise RuntimeError(f"every row must feed at least {keep} tokens, got {[len(p) for p in pending]}")
        start = self.mask.shape[1]
        rows = len(pending)
        if start == 0 and rows > 1 and rows * width > _PREFILL_WASTE * sum(len(p) for p in pending):
            return self._prefill_apart(pending, keep)
        ids = torch.zeros((rows, width), dtype=torch.long)
        valid = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        for r, tokens in enumerate(pending):
            pad = width - len(tokens)
            held = len(self.tokens[r])
            ids[r, pad:] = torch.tensor(tokens, dtype=torch.long)
            valid[r, pad:] = 1
            positions[r, :] = held
            positions[r, pad:] = torch.arange(held, held + len(tokens))
            self.tokens[r].extend(tokens)
            self.columns[r].extend(range(start + pad, start + width))
        self.mask = torch.cat([self.mask, valid], dim=1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits[:, -keep:].argmax(dim=-1).cpu()

    def _prefill_apart(self, pending: list[list[int]], keep: int) -> torch.Tensor:
        """First feed of rows whose lengths differ a lot: each row alone, its keys and values then stitched in.

        Padding them into one forward would compute every hole as a token (12 rows of 40 to 770 tokens cost
        12 x 770 token-passes); apart, each row costs its own length and the cache layout is the same as the
        right-aligned batch's, so every later step is unchanged.
        """
        width = max(len(p) for p in pending)
        rows = len(pending)
        argmax, caches = [], []
        for tokens in pending:
            one = DynamicCache(config=self.model.config)
            out = self.model(
                input_ids=torch.tensor([tokens], dtype=torch.long, device=self.device),
                position_ids=torch.arange(len(tokens), device=self.device)[None],
                past_key_values=one,
                use_cache=True,
                logits_to_keep=keep,
            )
            argmax.append(out.logits[0, -keep:].argmax(dim=-1).cpu())
            caches.append(one)
        for layer in range(len(caches[0].layers)):
            parts = [(c.layers[layer].keys, c.layers[layer].values) for c in caches]
            heads, dim = parts[0][0].shape[1], parts[0][0].shape[3]
            keys = parts[0][0].new_zeros((rows, heads, width, dim))
            values = parts[0][1].new_zeros((rows, heads, width, parts[0][1].shape[3]))
            for r, (k, v) in enumerate(parts):
                keys[r, :, width - k.shape[2] :] = k[0]
                values[r, :, width - v.shape[2] :] = v[0]
            self.cache.update(keys, values, layer)
        valid = torch.zeros((rows, width), dtype=torch.long)
        for r, tokens in enumerate(pending):
            valid[r, width - len(tokens) :] = 1
            self.tokens[r].extend(tokens)
            self.columns[r].extend(range(width - len(tokens), width))
        self.mask = valid
        return torch.stack(argmax)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): finished sequences leave the batch."""
        if rows == list(range(len(self.tokens))):
            return
        self.cache.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=self.device))
        self.mask = self.mask[rows]
        self.tokens = [self.tokens[r] for r in rows]
        self.columns = [self.columns[r] for r in rows]


class Drafter(Protocol):
    """Anything that proposes the next k tokens, in the target's vocabulary, after each committed sequence.

    Rows are positional: `keep(rows)` says which of the current rows remain (the others finished).
    """

    def propose(self, sequences: list[list[int]], k: int) -> list[list[int]]: ...

    def keep(self, rows: list[int]) -> None: ...


class ModelDrafter:
    """A draft model with the target's vocabulary, proposing greedily from its own batched KV cache.

    Each row's cache is kept over the longest prefix it shares with the newly committed sequence, so after a
    rejection only the corrected tail is fed again.
    """

    def __init__(self, model):
        self._model = model
        self._rows: _Rows | None = None

    def propose(self, sequences: list[list[int]], k: int) -> list[list[int]]:
        if self._rows is None:
            self._rows = _Rows(self._model, len(sequences))
        rows = self._rows
        # The first forward catches each row up with its committed sequence (after a full acceptance this
        # includes the drafter's own last proposal, which it never fed), then one token each; the k-th proposal
        # is never fed.
        pending = [seq[rows.held_prefix(r, seq) :] for r, seq in enumerate(sequences)]
        proposals: list[list[int]] = [[] for _ in sequences]
        for _ in range(k):
            tokens = rows.feed(pending, 1)[:, 0].tolist()
            for row, token in zip(proposals, tokens, strict=True):
                row.append(token)
            pending = [[token] for token in tokens]
        return proposals

    def keep(self, rows: list[int]) -> None:
        if self._rows is not None:
            self._rows.keep_rows(rows)


def greedy_generate_batch(
    model, prompts: Sequence[list[int]], max_new_tokens: int, eos_token_ids: Iterable[int]
) -> list[list[int]]:
    """The model's own greedy decoding of each prompt, one token per row per forward.

    Returns the new tokens of each prompt; an EOS token is included when produced and ends that row.
    """
    _check(prompts, max_new_tokens)
    eos = set(eos_token_ids)
    runner = _Rows(model, len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    pending = [list(p) for p in prompts]
    with torch.inference_mode():
        while live:
            tokens = runner.feed(pending, 1)[:, 0].tolist()
            still: list[int] = []
            for r, (i, token) in enumerate(zip(live, tokens, strict=True)):
                outputs[i].append(token)
                if token not in eos and len(outputs[i]) < max_new_tokens:
                    still.append(r)
            runner.keep_rows(still)
            pending = [[tokens[r]] for r in still]
            live = [live[r] for r in still]
    return outputs


def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos_token_ids: Iterable[int]) -> list[int]:
    """The target's own greedy decoding of one prompt: the reference speculative output must equal."""
    return greedy_generate_batch(model, [input_ids], max_new_tokens, eos_token_ids)[0]


def _kept(candidates: list[int], room: int, eos: set[int]) -> tuple[list[int], bool]:
    """Candidates kept after truncation at the first EOS (inclusive) and at `room` tokens; whether EOS ended it."""
    kept: list[int] = []
    for token in candidates[:room]:
        kept.append(token)
        if token in eos:
            return kept, True
    return kept, False


def speculative_generate_batch(
    target,
    drafter: Drafter,
    prompts: Sequence[list[int]],
    k: int,
    max_new_tokens: int,
    eos_token_ids: Iterable[int],
) -> list[SpecResult]:
    """Greedy speculative decoding of each prompt with k drafted tokens per step; lossless when numerics agree.

    Always k drafts per step, even near the end: truncation afterwards keeps the same tokens a shorter draft
    would have produced.
    """
    _check(prompts, max_new_tokens)
    if k < 1:
        raise UserError(f"k (draft tokens per step) must be at least 1, got {k}")
    eos = set(eos_token_ids)
    verifier = _Rows(target, len(prompts))
    sequences = [list(p) for p in prompts]
    results = [SpecResult(tokens=[], steps=0) for _ in prompts]
    live = list(range(len(prompts)))
    with torch.inference_mode():
        while live:
            bases = [len(sequences[i]) for i in live]
            proposals = drafter.propose([sequences[i] for i in live], k)
            if [len(p) for p in proposals] != [k] * len(live):
                raise RuntimeError(
                    f"{type(drafter).__name__} proposed {[len(p) for p in proposals]} tokens, {k} per row were asked"
                )
            # Verify: the target scores each row's uncached tail plus its proposals in one forward. Position i of
            # a row's last k+1 logits is the target's choice after its sequence + proposals[:i].
            pending = [sequences[i][len(verifier.tokens[r]) :] + proposals[r] for r, i in enumerate(live)]
            choices = verifier.feed(pending, k + 1).tolist()
            still: list[int] = []
            for r, i in enumerate(live):
                drafted, chosen, result = proposals[r], choices[r], results[i]
                accepted = 0
                while accepted < k and drafted[accepted] == chosen[accepted]:
                    accepted += 1
                room = max_new_tokens - len(result.tokens)
                kept, hit_eos = _kept(drafted[:accepted] + [chosen[accepted]], room, eos)
                sequences[i].extend(kept)
                result.tokens.extend(kept)
                result.steps += 1
                result.appended_per_step.append(len(kept))
                result.accepted_per_step.append(accepted)
                if hit_eos or len(result.tokens) >= max_new_tokens:
                    continue
                # Keep only cache entries of committed tokens: the row holds base + k new positions, of which
                # base + accepted are committed (its correction/bonus token is fed next step).
                verifier.crop(r, bases[r] + accepted)
                still.append(r)
            verifier.keep_rows(still)
            drafter.keep(still)
            live = [live[r] for r in still]
    log.debug("speculative: %d sequences, %d steps", len(prompts), sum(r.steps for r in results))
    return results


def speculative_generate(
    target, drafter: Drafter, input_ids: list[int], k: int, max_new_tokens: int, eos_token_ids: Iterable[int]
) -> SpecResult:
    """Speculative decoding of one prompt (a batch of one)."""
    return speculative_generate_batch(target, drafter, [input_ids], k, max_new_tokens, eos_token_ids)[0]
