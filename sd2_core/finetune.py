"""Sparse supervised fine-tuning of a pruned draft with its masks fixed.

WHY: SD² recovers the accuracy lost to one-shot pruning by fine-tuning the draft on the target's
self-distilled answers, while keeping every pruned weight at exactly zero so the draft keeps its
sparsity (and its MAC savings). Two mechanisms guard the zeros: a gradient hook multiplies each
masked weight's gradient by its mask, and the mask is re-applied to the weights after every
optimizer step (AdamW's weight decay or a stale moment could otherwise move a zero).

Masks are keyed by *module* name ("model.layers.0.self_attn.q_proj" -> bool tensor shaped like its
weight, True = keep), the same keying as ``sd2_core.pruning.model_pruner.nonzero_masks``; the
parameter name ("model.layers.0.self_attn.q_proj.weight") is accepted too.

Loss is on the last assistant turn only (``sd2_core.chat.tokenize_chat_example``). `finetune_recipe` is
the `finetune` stage. Unless the config sets it, the learning rate is the SD² paper's for the draft's size and
kind of sparsity (``sd2_core.learning_rates``), and drafts at 75 % sparsity or more train
``high_sparsity_steps_factor`` times the steps (the paper: 32k instead of 16k); the manifest says which.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sd2_core.artifacts import Progress, Recipe, write_json
from sd2_core.chat import IGNORE_INDEX, tokenize_chat_example
from sd2_core.config import FinetuneConfig
from sd2_core.errors import UserError
from sd2_core.learning_rates import learning_rate_choice
from sd2_core.models import count_parameters, load_artifact, save_model, stored_parameters
from sd2_core.placement import Placement, check_fits, placement_of
from sd2_core.pruning.structure import measure_sparsity, nonzero_masks, params_summary
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # gradient clipping, as in common SFT recipes (HF Trainer's default)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
HIGH_SPARSITY = 0.75  # the paper trains its 75 % drafts twice as long (FinetuneConfig.high_sparsity_steps_factor)


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


def _step_loss(model, batch: dict[str, Tensor], micro: int, placement: Placement) -> Tensor:
    """Forward and backward of one optimizer step's batch in micro-batches of `micro` sequences.

    Each micro-batch's mean token loss is weighted by its share of the step's label tokens, so the
    accumulated gradient equals the whole batch's (up to float rounding) however the batch is cut.
    Returns the step's mean token loss (detached).
    """
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)  # tokens each row's loss averages over
    total = int(labelled.sum())
    step_loss = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
    for start in range(0, batch["input_ids"].shape[0], micro):
        part = {k: v[start : start + micro] for k, v in batch.items()}
        share = int(labelled[start : start + micro].sum()) / total
        if share == 0:
            continue
        with placement.autocast():
            loss = model(**part).loss.float()
        (loss * share).backward()
        step_loss += loss.detach() * share
    return step_loss


def learning_rate(cfg: FinetuneConfig, num_params: int, sparsity: float, kind: str | None = None) -> tuple[float, str]:
    """The peak learning rate and where it came from: the config's as given, else Appendix A's times lr_scale."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate, "set in the config (learning_rate)"
    choice = learning_rate_choice(num_params, sparsity, kind)
    if cfg.lr_scale == 1.0:
        return choice.lr, choice.source
    return choice.lr * cfg.lr_scale, f"{choice.source}: {choice.lr:g} × lr_scale {cfg.lr_scale:g}"


def finetune_sparse(
    model,
    tokenizer,
    examples: list[dict],
    cfg: FinetuneConfig,
    masks: dict[str, Tensor] | None = None,
    num_params_for_lr: int | None = None,
    sparsity_for_lr: float = 0.0,
    progress: Progress | None = None,
    kind_for_lr: str | None = None,
) -> dict:
    """Fine-tune ``model`` in place on chat rows ``{"messages": [...]}``, pruned weights held at zero.

    ``masks`` (module name -> bool keep-mask) default to the current non-zeros of the decoder
    Linear weights. The learning rate is ``cfg.learning_rate``, else the paper's for the draft (`learning_rate`:
    ``num_params_for_lr``, default the model's parameter count; ``sparsity_for_lr``; ``kind_for_lr``, one of
    ``learning_rates.KINDS``, default dense at sparsity 0, else unstructured). ``cfg.steps`` is the step count.
    The model's own weights are the master weights (float32 when loaded by the stage); a bfloat16 or
    float16 ``cfg.dtype`` trains under autocast to it. Returns per-step losses and throughput; the model
    is left in eval mode.
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

    lr, lr_source = learning_rate(cfg, num_params_for_lr or count_parameters(model), sparsity_for_lr, kind_for_lr)
    log.info("learning rate %.3g: %s", lr, lr_source)

    fixed = _resolve_masks(model, nonzero_masks(model) if masks is None else masks)
    device = next(model.parameters()).device
    placement = Placement(device, placement_of(cfg).dtype)  # the precision asked for, where the model is
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
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
                loss = _step_loss(model, batch, micro, placement)
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
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_disable()
            model.config.use_cache = True
        model.eval()
    seconds = time.perf_counter() - start
    return {
        "losses": losses,
        "lr": lr,
        "lr_source": lr_source,
        "steps": cfg.steps,
        "tokens": tokens,
        "skipped": skipped,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }


class DraftVariant(NamedTuple):
    """What the learning-rate table and the step count need to know of the draft being fine-tuned."""

    kind: str  # one of learning_rates.KINDS
    sparsity: float  # the pruning stage's target (2:4 = 0.5), 0 for a dense draft
    base_params: int | None  # the parameter count of the model it was pruned from, when the draft lost some


def draft_variant(store: Store, draft: ArtifactRef) -> DraftVariant:
    """The draft's kind of sparsity and its target, from the stage that made it (its manifest)."""
    from sd2_core.pruning.sparsity import parse_sparsity

    if draft.stage == "model":
        return DraftVariant("dense", 0.0, None)
    if draft.stage == "prune" and draft.summary.get("sparsity_target"):
        spec = parse_sparsity(draft.summary["sparsity_target"])
        return DraftVariant("nm" if spec.is_nm else "unstructured", spec.fraction, None)
    manifest = store.manifest(draft.stage, draft.key)
    summary = {**manifest.get("summary", {}), **draft.summary}
    if draft.stage in ("prune", "layerprune"):
        spec = parse_sparsity(summary.get("sparsity_target") or manifest["config"]["sparsity"])
        if draft.stage == "prune":
            return DraftVariant("nm" if spec.is_nm else "unstructured", spec.fraction, None)
        # the paper's rows are the models layer pruning starts from, before their blocks were dropped
        base = next(
            (i["summary"].get("total_params") for i in manifest.get("inputs", []) if i["stage"] == "model"), None
        )
        return DraftVariant("layer", spec.fraction, base)
    if summary.get("sparsity_kind"):  # an already fine-tuned draft keeps what its own fine-tuning found
        return DraftVariant(summary["sparsity_kind"], summary["sparsity_target_fraction"], summary.get("lr_params"))
    measured = float(summary.get("sparsity", 0.0))
    return DraftVariant("dense" if measured == 0 else "unstructured", measured, None)


def steps_factor(cfg: FinetuneConfig, sparsity: float) -> float:
    """How many times `steps` this draft trains: high_sparsity_steps_factor at >= 75 % sparsity, else 1."""
    return cfg.high_sparsity_steps_factor if sparsity >= HIGH_SPARSITY - 1e-9 else 1.0


def trained_steps(cfg: FinetuneConfig, sparsity: float) -> int:
    """The optimizer steps this draft trains (at least one)."""
    return max(1, round(cfg.steps * steps_factor(cfg, sparsity)))


def finetune_recipe(store: Store, draft: ArtifactRef, distilled: list[ArtifactRef], cfg: FinetuneConfig) -> Recipe:
    """The `finetune` stage: the pruned draft fine-tuned on the distilled mix, pruned weights held at zero."""
    from sd2_core.data.mixing import mix_examples
    from sd2_core.data.sources import read_records

    placement = placement_of(cfg)  # refuses a device this machine lacks before anything loads
    variant = draft_variant(store, draft)
    run = cfg.model_copy(update={"steps": trained_steps(cfg, variant.sparsity)})

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        sources: dict[str, list[dict[str, Any]]] = {}
        for ref in distilled:
            kind = ref.summary.get("kind") or store.manifest(ref.stage, ref.key)["config"]["source"]["kind"]
            sources[kind] = read_records(store.local_dir(ref) / "data.jsonl")
        weights = {k: w for k, w in cfg.mix.items() if k in sources or w > 0}
        examples = mix_examples(sources, weights, run.steps * run.batch_size, cfg.seed)
        # weights, gradients and AdamW's two moments, all float32: four copies of the draft on the device
        check_fits(
            f"fine-tuning the draft {draft.key}",
            stored_parameters(store.local_dir(draft)),
            torch.float32,
            [placement.device],
            factor=4,
        )
        model, tokenizer = load_artifact(store, draft, dtype=torch.float32, device=placement.device)
        lr_params = variant.base_params or measure_sparsity(model)["total_params"]
        result = finetune_sparse(
            model,
            tokenizer,
            examples,
            run,
            num_params_for_lr=lr_params,
            sparsity_for_lr=variant.sparsity,
            progress=progress,
            kind_for_lr=variant.kind,
        )
        save_model(model, tokenizer, out)
        write_json(out / "losses.json", result)
        return {
            **params_summary(measure_sparsity(model)),
            "lr": result["lr"],
            "lr_source": result["lr_source"],
            "lr_params": lr_params,
            "sparsity_kind": variant.kind,
            "sparsity_target_fraction": variant.sparsity,
            "steps": result["steps"],
            "steps_factor": steps_factor(cfg, variant.sparsity),
            "loss_first": result["losses"][0],
            "loss_last": result["losses"][-1],
            "tokens_per_second": result["tokens_per_second"],
        }

    config = {**cfg.model_dump(mode="json", exclude={"device", "dtype"}), "placement": placement.identity}
    return Recipe("finetune", config, (draft, *distilled), build, code=__name__)
