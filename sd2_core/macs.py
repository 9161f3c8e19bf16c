"""Multiply-accumulates per generated token, and the theoretical improvement factor MAL / (k·c + 1).

Counting rules (Llama-style decoders): a Linear costs one MAC per NON-ZERO weight (a pruned weight is
skipped by a sparse kernel, so it costs nothing; biases are additions, not MACs); the lm_head likewise;
the embedding is a table lookup (0 MACs); attention over a context of L positions costs, per layer,
num_attention_heads × head_dim × L for QKᵀ and the same again for attention·V. Norms, activations and
rotary embeddings are elementwise and left out, as in the paper's counting.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sd2_core.errors import UserError

log = logging.getLogger(__name__)


def _nonzero(weight: torch.Tensor) -> int:
    return int(torch.count_nonzero(weight.detach()))


def _head_dims(config) -> tuple[int, int]:
    """(num_attention_heads, head_dim) from the config; head_dim defaults to hidden_size / heads."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    return heads, int(head_dim) if head_dim else int(config.hidden_size) // heads


def _num_layers(model) -> int:
    """Decoder blocks actually present (a layer-pruned model may have fewer than its original config said)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return len(layers) if layers is not None else int(model.config.num_hidden_layers)


def _weight_macs(model) -> tuple[int, int]:
    """(decoder Linear MACs, lm_head MACs): non-zero weights of each, context-independent."""
    head = model.get_output_embeddings()
    lm_head = _nonzero(head.weight) if head is not None else 0
    linear = sum(_nonzero(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return linear, lm_head


def _attention_per_position(model) -> int:
    """Attention MACs per context position for one new token, all layers: 2 × heads × head_dim × layers."""
    heads, head_dim = _head_dims(model.config)
    return 2 * heads * head_dim * _num_layers(model)


def _macs_at(model, context: float) -> dict:
    """MACs of one token attending to `context` positions: total and its three parts."""
    linear, lm_head = _weight_macs(model)
    attention = _attention_per_position(model) * context
    return {"total": linear + lm_head + attention, "linear": linear, "attention": attention, "lm_head": lm_head}


def macs_per_token(model, context_len: int) -> dict:
    """MACs to generate ONE token whose query attends to `context_len` positions."""
    if context_len < 1:
        raise UserError(f"context_len must be at least 1 (the token attends to itself), got {context_len}")
    return {**_macs_at(model, context_len), "context_len": context_len}


def average_macs_per_token(model, prompt_len: int, new_tokens: int) -> dict:
    """Mean MACs per generated token over a generation of `new_tokens` after a `prompt_len`-token prompt.

    Why an average: the attention term grows with the context, so one context length would misstate the
    draft/target cost ratio c of a real decode. Generated token i (0-based) is produced by the position that
    attends to prompt_len + i positions, so contexts run prompt_len .. prompt_len + new_tokens - 1; the cost
    is affine in the context, so the mean is the cost at the mean context (exact, not sampled).
    """
    if prompt_len < 1:
        raise UserError(f"prompt_len must be at least 1, got {prompt_len}")
    if new_tokens < 1:
        raise UserError(f"new_tokens must be at least 1, got {new_tokens}")
    mean_context = prompt_len + (new_tokens - 1) / 2
    return {
        **_macs_at(model, mean_context),
        "mean_context_len": mean_context,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
    }


def cost_ratio(draft, target, prompt_len: int, new_tokens: int) -> dict:
    """c, the draft's cost per token relative to the target's, in MACs averaged over one generation,
    with both models' `average_macs_per_token` breakdowns."""
    draft_macs = average_macs_per_token(draft, prompt_len, new_tokens)
    target_macs = average_macs_per_token(target, prompt_len, new_tokens)
    return {"c": draft_macs["total"] / target_macs["total"], "draft": draft_macs, "target": target_macs}


def improvement_factor(mal: float, k: int, c: float) -> float:
    """Speed-up of speculative decoding over the target alone: MAL / (k·c + 1).

    Each step costs k draft forwards (c each, relative to the target) plus one target forward and yields MAL
    tokens, where plain decoding yields one token per target forward.
    """
    if k < 1:
        raise UserError(f"k (draft tokens per step) must be at least 1, got {k}")
    if not c >= 0:
        raise UserError(f"c (draft/target cost ratio) must be >= 0, got {c}")
    if not mal > 0:
        raise UserError(f"mal must be positive (it is at least 1 for any real measurement), got {mal}")
    return mal / (k * c + 1)
