"""Sparse supervised fine-tuning of a pruned draft with its masks fixed.

WHY: SD² recovers the accuracy lost to one-shot pruning by fine-tuning the draft on the target's
self-distilled answers, while keeping every pruned weight at exactly zero so the draft keeps its
sparsity (and its MAC savings). Two mechanisms guard the zeros: a gradient hook multiplies each
masked weight's gradient by its mask, and the mask is re-applied to the weights after every
optimizer step (AdamW's weight decay or a stale moment could otherwise move a zero).

Masks are keyed by *module* name ("model.layers.0.self_attn.q_proj" -> bool tensor shaped like its
weight, True = keep), the same keying as ``sd2_core.pruning.model_pruner.nonzero_masks``; the
parameter name ("model.layers.0.self_attn.q_proj.weight") is accepted too.

Loss is on the last assistant turn only: the chat template renders the conversation without that
turn plus the generation prompt (the prefix), and the tokens after the prefix are the response.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sd2_core.config import FinetuneConfig
from sd2_core.errors import UserError
from sd2_core.learning_rates import paper_learning_rate
from sd2_core.models import count_parameters
from sd2_core.pruning.model_pruner import nonzero_masks

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_GRAD_NORM = 1.0  # gradient clipping, as in common SFT recipes (HF Trainer's default)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

Progress = Callable[[int, int, str], None]


# ---------------------------------------------------------------- tokenization


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as exc:  # transformers raises ValueError when the tokenizer has no chat template
        raise UserError(f"the tokenizer cannot render a chat ({exc}); use a tokenizer with a chat template") from None


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError(f"messages must be a list of at least a user and an assistant turn, got {messages!r:.200}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"each message needs string 'role' and 'content', got {m!r:.200}")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"the last message must be the assistant's response, got role {messages[-1]['role']!r}")
    return messages


def tokenize_chat_example(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of one chat, labels -100 everywhere but the final assistant response.

    Both are cut to ``max_seq_len``; when the cut removes the whole response every label is -100
    (the caller skips such rows).
    """
    if max_seq_len < 1:
        raise UserError(f"max_seq_len must be at least 1, got {max_seq_len}")
    messages = _check_messages(messages)
    prefix_text = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    # The rendered chat already carries the template's special tokens (BOS, turn markers).
    prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prefix_ids)] != prefix_ids:
        pairs = zip(prefix_ids, full_ids, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prefix_ids), len(full_ids)))
        raise UserError(
            "the chat template's prompt with generation prompt does not tokenize to a prefix of the full chat "
            f"(first difference at token {at}: prefix {prefix_ids[at : at + 5]} vs full {full_ids[at : at + 5]}); "
            "the response cannot be located, use a tokenizer whose template renders the prompt as a prefix"
        )
    if len(full_ids) == len(prefix_ids):
        raise UserError(f"the assistant response renders to no tokens: {messages[-1]['content']!r:.200}")
    labels = [IGNORE_INDEX] * len(prefix_ids) + full_ids[len(prefix_ids) :]
    return full_ids[:max_seq_len], labels[:max_seq_len]


# ---------------------------------------------------------------- data mixing


def mix_examples(sources: dict[str, list[dict]], weights: dict[str, float], total: int, seed: int) -> list[dict]:
    """``total`` rows drawn from the sources in proportion to ``weights`` (deterministic by seed).

    Each source's share is rounded by largest remainder so the counts add up to ``total``. A source
    asked for more rows than it holds is cycled through fresh shuffles (every row used evenly), i.e.
    sampled with replacement; otherwise rows are drawn without replacement. Sources without a
    weight are not used.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise UserError(f"total must be a positive integer, got {total!r}")
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0}
    if bad:
        raise UserError(f"mix weights must be finite and non-negative, got {bad}")
    missing = sorted(k for k, w in weights.items() if w > 0 and k not in sources)
    if missing:
        raise UserError(f"mix weights name sources that are missing: {missing}; available sources: {sorted(sources)}")
    empty = sorted(k for k, w in weights.items() if w > 0 and not sources[k])
    if empty:
        raise UserError(f"mix weights ask for rows from empty sources: {empty}")
    used = sorted(k for k, w in weights.items() if w > 0)
    if not used:
        raise UserError(f"mix weights are all zero: {weights}; give at least one source a positive weight")
    unweighted = sorted(set(sources) - set(weights))
    if unweighted:
        log.info("sources without a mix weight are not used: %s", unweighted)

    norm = sum(weights[k] for k in used)
    exact = {k: total * weights[k] / norm for k in used}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(used, key=lambda k: (-(exact[k] - counts[k]), k))[: total - sum(counts.values())]:
        counts[k] += 1

    rng = random.Random(seed)
    out: list[dict] = []
    for name in used:
        rows = sources[name]
        picked: list[dict] = []
        while len(picked) < counts[name]:
            order = list(range(len(rows)))
            rng.shuffle(order)
            picked.extend(rows[i] for i in order[: counts[name] - len(picked)])
        out.extend(picked)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- masks


def _resolve_masks(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, tuple[nn.Parameter, Tensor]]:
    modules = dict(model.named_modules())
    resolved: dict[str, tuple[nn.Parameter, Tensor]] = {}
    for key, mask in masks.items():
        name = key[: -len(".weight")] if key.endswith(".weight") and key not in modules else key
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise UserError(
                f"mask key {key!r} names no module with a weight; expected e.g. 'model.layers.0.mlp.up_proj'"
            )
        if tuple(mask.shape) != tuple(weight.shape):
            raise UserError(f"mask {key!r} has shape {tuple(mask.shape)}, its weight has {tuple(weight.shape)}")
        keep = (mask if mask.dtype == torch.bool else mask != 0).to(weight.device)
        resolved[name] = (weight, keep)
    return resolved


# ---------------------------------------------------------------- schedule and batches


def warmup_linear_decay(steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear rise over the warm-up, then linear decay; every step's factor is > 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    return factor


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices for every step: successive seeded permutations of the rows, cut into batches."""
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        order = list(range(n))
        rng.shuffle(order)
        stream.extend(order)
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- training


def finetune_sparse(
    model,
    tokenizer,
    examples: list[dict],
    cfg: FinetuneConfig,
    masks: dict[str, Tensor] | None = None,
    num_params_for_lr: int | None = None,
    sparsity_for_lr: float = 0.0,
    progress: Progress | None = None,
) -> dict:
    """Fine-tune ``model`` in place on chat rows ``{"messages": [...]}``, pruned weights held at zero.

    ``masks`` (module name -> bool keep-mask) default to the current non-zeros of the decoder
    Linear weights. The learning rate is ``cfg.learning_rate``, else the size/sparsity default of
    ``paper_learning_rate`` (``num_params_for_lr`` defaults to the model's parameter count).
    Returns per-step losses and throughput; the model is left in eval mode.
    """
    rows: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for i, example in enumerate(examples):
        if not isinstance(example, dict) or "messages" not in example:
            raise UserError(f"example {i} is not a row {{'messages': [...]}}: {example!r:.200}")
        ids, labels = tokenize_chat_example(tokenizer, example["messages"], cfg.max_seq_len)
        if all(label == IGNORE_INDEX for label in labels):
            skipped += 1
        else:
            rows.append((ids, labels))
    if not rows:
        raise UserError(
            f"no usable fine-tuning examples: {len(examples)} given, {skipped} lost their whole response to "
            f"max_seq_len={cfg.max_seq_len}; give examples or raise max_seq_len"
        )
    if skipped:
        log.warning(
            "%d of %d examples skipped: response cut entirely by max_seq_len=%d",
            skipped,
            len(examples),
            cfg.max_seq_len,
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("the tokenizer has neither a pad nor an eos token to pad batches with")

    if cfg.learning_rate is not None:
        lr = cfg.learning_rate
    else:
        lr = paper_learning_rate(num_params_for_lr or count_parameters(model), sparsity_for_lr)
        log.info("learning rate %.3g from the size/sparsity table (sparsity %.3f)", lr, sparsity_for_lr)

    fixed = _resolve_masks(model, nonzero_masks(model) if masks is None else masks)
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
    )
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(cfg.steps, warmup))
    plan = _batches(len(rows), cfg.batch_size, cfg.steps, cfg.seed)

    hooks = []
    losses: list[float] = []
    tokens = 0
    devices = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for weight, keep in fixed.values():
                weight.masked_fill_(~keep, 0.0)
        for weight, keep in fixed.values():
            if weight.requires_grad:
                scale = keep.to(weight.dtype)
                hooks.append(weight.register_hook(lambda grad, scale=scale: grad * scale))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            model.train()
            for step, indices in enumerate(plan):
                batch = _collate([rows[i] for i in indices], pad_id, device)
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for weight, keep in fixed.values():
                        weight.masked_fill_(~keep, 0.0)
                losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                if progress is not None:
                    progress(step + 1, cfg.steps, f"loss {losses[-1]:.4f}")
                if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
                    log.info("step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    finally:
        for handle in hooks:
            handle.remove()
        model.eval()
    seconds = time.perf_counter() - start
    return {
        "losses": losses,
        "lr": lr,
        "steps": cfg.steps,
        "tokens": tokens,
        "skipped": skipped,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }
