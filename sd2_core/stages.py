"""The SD² stages as plain functions over the artifact store.

Each stage derives its artifact key from its config, its inputs' digests and the code version;
if the store already holds that artifact complete, it returns it without computing anything.
Otherwise it builds the artifact in a local scratch folder and publishes it (manifest last).
The Prefect tasks wrap exactly these functions; the CLI calls them directly.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd2_core import __version__
from sd2_core.config import DistillConfig, FinetuneConfig, MalConfig, PruneConfig, SourceSpec
from sd2_core.errors import UserError
from sd2_core.models import (
    builtin_dir,
    builtin_identity,
    is_builtin,
    load_model,
    load_tokenizer,
    resolve_local_or_hub,
    save_model,
)
from sd2_core.store import ArtifactRef, Store, artifact_key, file_sha256

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

# Bump a stage's number when its algorithm changes (prompt templates and leak markers included),
# so old artifacts stop matching.
STAGE_CODE = {
    "model": "2",
    "distill": "1",
    "prune": "1",
    "layerprune": "1",
    "finetune": "1",
    "reference": "1",
    "mal": "1",
    "results": "1",
}
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


@dataclass(frozen=True)
class Planned:
    """What a stage call would produce: its artifact key and whether the store has it complete."""

    stage: str
    key: str
    uri: str
    complete: bool


def code_version(stage: str) -> str:
    return f"sd2-{__version__}/{stage}-{STAGE_CODE[stage]}"


def versions() -> dict[str, str]:
    import transformers

    return {
        "sd2": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _stage(
    store: Store,
    stage: str,
    config: dict[str, Any],
    inputs: list[ArtifactRef],
    build: Callable[[Path], dict[str, Any]],
    plan_only: bool = False,
) -> ArtifactRef | Planned:
    """Return the complete artifact for (stage, config, inputs), building it only when absent.

    With plan_only, build nothing: say which artifact the call stands for and whether it exists
    (the Prefect layer uses this for cache keys that never point at a missing artifact).
    """
    key = artifact_key(stage, config, inputs, code_version(stage))
    if plan_only:
        return Planned(stage, key, store.uri_of(stage, key), store.is_complete(stage, key))
    if store.is_complete(stage, key):
        log.info("%s %s: found complete in the store, nothing to do", stage, key)
        return store.ref(stage, key)
    log.info("%s %s: building", stage, key)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"sd2-{stage}-") as tmp:
        summary = build(Path(tmp))
        seconds = round(time.time() - start, 3)
        summary = {**summary, "seconds": seconds}
        return store.publish(
            stage,
            key,
            Path(tmp),
            config=config,
            inputs=inputs,
            timings={"seconds": seconds},
            summary=summary,
            versions=versions(),
        )


def _folder_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name in MODEL_FILES):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _copy_model_files(src: Path, out: Path) -> None:
    found = [p for p in src.iterdir() if p.is_file() and p.name in MODEL_FILES]
    if not any(p.name == "model.safetensors" for p in found):
        raise UserError(
            f"model folder {src} has no model.safetensors (sharded or .bin checkpoints: re-save it "
            "with save_pretrained(..., safe_serialization=True, max_shard_size='100GB'))"
        )
    for p in found:
        shutil.copy2(p, out / p.name)


def _store_ref_of(store: Store, ref: str) -> ArtifactRef | None:
    """A reference that names an artifact of this store: 'stage/key', 'artifact:stage/key', or its URI/folder."""
    text = ref.rstrip("/")
    for prefix in (store.uri + "/", "artifact:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    else:
        path = Path(text).expanduser()
        if store.is_local and path.is_dir() and path.resolve().parent.parent == Path(store.root):
            text = f"{path.resolve().parent.name}/{path.name}"
    parts = text.split("/")
    if len(parts) == 2 and parts[0] in STAGE_CODE and store.is_complete(parts[0], parts[1]):
        return store.ref(parts[0], parts[1])
    return None


def materialize_model(store: Store, ref: str, plan_only: bool = False) -> ArtifactRef | Planned:
    """Any model reference as a `model` artifact (an HF folder in the store); store artifacts pass through."""
    existing = _store_ref_of(store, ref)
    if existing is not None:
        return Planned(existing.stage, existing.key, existing.uri, True) if plan_only else existing
    if is_builtin(ref):
        config = {"ref": ref, "identity": builtin_identity(ref)}
        source = None
    else:
        source = resolve_local_or_hub(ref)
        config = {"ref": ref, "content": _folder_digest(source)}

    def build(out: Path) -> dict[str, Any]:
        from sd2_core.pruning.model_pruner import measure_sparsity

        src = builtin_dir(ref) if source is None else source
        _copy_model_files(src, out)
        cfg = json.loads((out / "config.json").read_text())
        measured = measure_sparsity(load_model(out))
        return {
            "ref": ref,
            "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers"),
            "sparsity": measured["overall"],
            "nonzero_params": measured["nonzero_params"],
            "total_params": measured["total_params"],
        }

    return _stage(store, "model", config, [], build, plan_only)


def _load(store: Store, ref: ArtifactRef):
    path = store.local_dir(ref)
    return load_model(path), load_tokenizer(path), path


def distill(
    store: Store,
    target: ArtifactRef,
    source: SourceSpec,
    cfg: DistillConfig,
    progress: Progress | None = None,
    plan_only: bool = False,
) -> ArtifactRef | Planned:
    """The target answers one source's instructions in its own words (self-data distillation)."""
    from sd2_core.data.sources import load_source
    from sd2_core.distill import distill_rows
    from sd2_core.generation import make_generator

    config = {
        "source": source.model_dump(mode="json"),
        "distill": cfg.model_dump(mode="json"),
        **data_identity(source.uri),
    }

    def build(out: Path) -> dict[str, Any]:
        rows = load_source(source)
        if cfg.backend == "vllm":  # vLLM loads the weights itself: no second copy in this process
            generator = make_generator("vllm", model_path=store.local_dir(target))
        else:
            model, tokenizer, path = _load(store, target)
            generator = make_generator(
                cfg.backend, model=model, tokenizer=tokenizer, model_path=path, batch_size=cfg.batch_size
            )
        distilled, stats = distill_rows(generator, rows, cfg, progress=progress)
        with open(out / "data.jsonl", "w") as fh:
            for row in distilled:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        return {"kind": source.kind, **stats}

    return _stage(store, "distill", config, [target], build, plan_only)


def prune(
    store: Store, draft: ArtifactRef, cfg: PruneConfig, progress: Progress | None = None, plan_only: bool = False
) -> ArtifactRef | Planned:
    """SparseGPT one-shot pruning of the draft's decoder Linear layers on real calibration text."""
    from sd2_core.data.calibration import load_calibration
    from sd2_core.pruning.model_pruner import measure_sparsity, prune_model
    from sd2_core.pruning.sparsity import parse_sparsity

    spec = parse_sparsity(cfg.sparsity)

    def build(out: Path) -> dict[str, Any]:
        model, tokenizer, _ = _load(store, draft)
        input_ids, attention_mask = load_calibration(tokenizer, cfg.calibration)
        report = prune_model(
            model, input_ids, attention_mask, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp, progress=progress
        )
        sparsity = measure_sparsity(model)
        save_model(model, tokenizer, out)
        (out / "prune_report.json").write_text(
            json.dumps({"report": report, "sparsity": sparsity}, indent=2, default=str)
        )
        retries = sum(int(m.get("retries", 0)) for m in report.get("per_module", {}).values())
        return {
            "sparsity_target": spec.label,
            "sparsity": sparsity["overall"],
            "nonzero_params": sparsity["nonzero_params"],
            "total_params": sparsity["total_params"],
            "damp_retries": retries,
        }

    if cfg.method != "sparsegpt":
        raise UserError(f"prune runs SparseGPT; method {cfg.method!r} belongs to another stage (see prune_variant)")
    # The stage is SparseGPT: `method` is implied by it and stays out of the key.
    config = {**cfg.model_dump(mode="json", exclude={"method"}), **data_identity(cfg.calibration.uri)}
    return _stage(store, "prune", config, [draft], build, plan_only)


def layer_prune(
    store: Store, draft: ArtifactRef, cfg: PruneConfig, progress: Progress | None = None, plan_only: bool = False
) -> ArtifactRef | Planned:
    """Drop the contiguous `sparsity` fraction of the draft's decoder blocks with the smallest angular distance."""
    from sd2_core.data.calibration import load_calibration
    from sd2_core.pruning.layer_pruner import prune_layers
    from sd2_core.pruning.model_pruner import decoder_linears, measure_sparsity
    from sd2_core.pruning.sparsity import parse_sparsity

    if cfg.method != "layer":
        raise UserError(f"layer_prune drops decoder blocks; method {cfg.method!r} belongs to another stage")
    fraction = parse_sparsity(cfg.sparsity).fraction

    def build(out: Path) -> dict[str, Any]:
        model, tokenizer, _ = _load(store, draft)
        linear_before = sum(m.weight.numel() for m in decoder_linears(model).values())
        input_ids, attention_mask = load_calibration(tokenizer, cfg.calibration)
        if progress:
            progress(0, 1, "measuring angular distances between blocks")
        pruned, report = prune_layers(model, input_ids, attention_mask, fraction)
        if progress:
            progress(1, 1, f"dropped blocks {report['dropped'][0]}..{report['dropped'][-1]}")
        linear_nonzero_after = sum(int(torch.count_nonzero(m.weight)) for m in decoder_linears(pruned).values())
        measured = measure_sparsity(pruned)
        save_model(pruned, tokenizer, out)
        (out / "layer_prune_report.json").write_text(json.dumps(report, indent=2))
        return {
            "sparsity_target": cfg.sparsity,
            # of the original draft's decoder Linear weights, the fraction that is gone (removed or zero)
            "sparsity": 1.0 - linear_nonzero_after / linear_before,
            "nonzero_params": measured["nonzero_params"],
            "total_params": measured["total_params"],
            "dropped": report["dropped"],
            "num_layers_after": report["num_layers_after"],
        }

    config = {
        "sparsity": cfg.sparsity,
        "calibration": cfg.calibration.model_dump(mode="json"),
        **data_identity(cfg.calibration.uri),
    }
    return _stage(store, "layerprune", config, [draft], build, plan_only)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def finetune(
    store: Store,
    draft: ArtifactRef,
    distilled: list[ArtifactRef],
    cfg: FinetuneConfig,
    progress: Progress | None = None,
    plan_only: bool = False,
) -> ArtifactRef | Planned:
    """Fine-tune the pruned draft on the distilled mix; pruned weights stay exactly zero."""
    from sd2_core.finetune import finetune_sparse, mix_examples
    from sd2_core.pruning.model_pruner import measure_sparsity

    def build(out: Path) -> dict[str, Any]:
        sources: dict[str, list[dict[str, Any]]] = {}
        for ref in distilled:
            kind = ref.summary.get("kind") or store.manifest(ref.stage, ref.key)["config"]["source"]["kind"]
            sources[kind] = read_jsonl(store.local_dir(ref) / "data.jsonl")
        weights = {k: w for k, w in cfg.mix.items() if k in sources or w > 0}
        examples = mix_examples(sources, weights, cfg.steps * cfg.batch_size, cfg.seed)
        model, tokenizer, _ = _load(store, draft)
        before = measure_sparsity(model)
        result = finetune_sparse(
            model,
            tokenizer,
            examples,
            cfg,
            num_params_for_lr=before["total_params"],
            sparsity_for_lr=before["overall"],
            progress=progress,
        )
        after = measure_sparsity(model)
        save_model(model, tokenizer, out)
        (out / "losses.json").write_text(json.dumps(result, indent=2))
        losses = result["losses"]
        return {
            "sparsity": after["overall"],
            "nonzero_params": after["nonzero_params"],
            "total_params": after["total_params"],
            "lr": result["lr"],
            "steps": result["steps"],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "tokens_per_second": result["tokens_per_second"],
        }

    return _stage(store, "finetune", cfg.model_dump(mode="json"), [draft, *distilled], build, plan_only)


def _mal_prompts(cfg: MalConfig):
    from sd2_core.data.prompts import load_prompts

    return load_prompts(cfg.prompts, per_category=cfg.per_category)


def data_identity(uri: str) -> dict[str, Any]:
    """Content digest of the data a stage reads, so that editing a file invalidates what was built from it.

    'embedded' and 'specbench' name files shipped inside sd2; a local path is hashed; hub ids are
    identified by name only (pin a revision in the id for exact reproducibility).
    """
    from sd2_core.data import EMBEDDED_DIR

    if uri in ("embedded", "specbench"):
        import hashlib

        h = hashlib.sha256()
        for f in sorted(EMBEDDED_DIR.glob("*.jsonl")):
            h.update(f.name.encode() + file_sha256(f).encode())
        return {"data_sha256": h.hexdigest()}
    path = Path(uri).expanduser()
    return {"data_sha256": file_sha256(path)} if path.is_file() else {}


def reference(
    store: Store, target: ArtifactRef, cfg: MalConfig, progress: Progress | None = None, plan_only: bool = False
) -> ArtifactRef | Planned:
    """The target's own greedy outputs, shared by every MAL measurement against this target."""
    from sd2_core.mal import greedy_reference

    config = {
        "prompts": cfg.prompts,
        "per_category": cfg.per_category,
        "max_new_tokens": cfg.max_new_tokens,
        **data_identity(cfg.prompts),
    }

    def build(out: Path) -> dict[str, Any]:
        prompts = _mal_prompts(cfg)
        model, tokenizer, _ = _load(store, target)
        start = time.time()
        ref = greedy_reference(model, tokenizer, prompts, cfg.max_new_tokens, progress=progress)
        tokens = sum(len(t) for turns in ref.values() for t in turns)
        (out / "reference.json").write_text(json.dumps(ref))
        seconds = time.time() - start
        return {"prompts": len(prompts), "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}

    return _stage(store, "reference", config, [target], build, plan_only)


def mal(
    store: Store,
    target: ArtifactRef,
    draft: ArtifactRef,
    ref: ArtifactRef,
    cfg: MalConfig,
    progress: Progress | None = None,
    plan_only: bool = False,
) -> ArtifactRef | Planned:
    """MAL of the draft against the target, with lossless check, MACs per token and improvement factor."""
    from sd2_core.macs import average_macs_per_token, improvement_factor
    from sd2_core.mal import measure_mal

    config = {**cfg.model_dump(mode="json"), **data_identity(cfg.prompts)}

    def build(out: Path) -> dict[str, Any]:
        prompts = _mal_prompts(cfg)
        reference_tokens = json.loads(store.read_text(ref, "reference.json"))
        target_model, tokenizer, _ = _load(store, target)
        draft_model, draft_tokenizer, _ = _load(store, draft)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"draft {draft.summary.get('ref', draft.uri)} and target {target.summary.get('ref', target.uri)} "
                "have different vocabularies; token-level speculative decoding needs a draft with the target's "
                "tokenizer (cross-tokenizer drafting is not supported)"
            )
        result = measure_mal(
            target_model,
            draft_model,
            tokenizer,
            prompts,
            cfg.k,
            cfg.max_new_tokens,
            reference=reference_tokens,
            progress=progress,
        )
        prompt_len = _mean_prompt_len(tokenizer, prompts)
        macs_draft = average_macs_per_token(draft_model, prompt_len, cfg.max_new_tokens)
        macs_target = average_macs_per_token(target_model, prompt_len, cfg.max_new_tokens)
        c = macs_draft["total"] / macs_target["total"]
        result["macs_per_token"] = {"draft": macs_draft, "target": macs_target, "context_len_mean": prompt_len}
        result["c"] = c
        result["improvement_factor_theoretical"] = improvement_factor(result["mal"], cfg.k, c)
        (out / "mal.json").write_text(json.dumps(result, indent=2))
        return {
            "mal": result["mal"],
            "mal_per_category": result["mal_per_category"],
            "lossless": result["lossless"],
            "macs_per_token": {"draft": macs_draft["total"], "target": macs_target["total"]},
            "c": c,
            "improvement_factor_theoretical": result["improvement_factor_theoretical"],
            "k": cfg.k,
            "steps": result["steps"],
            "tokens": result["tokens"],
        }

    return _stage(store, "mal", config, [target, draft, ref], build, plan_only)


def _mean_prompt_len(tokenizer, prompts) -> int:
    lengths = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.turns[0]}], add_generation_prompt=True, tokenize=True
        )
        lengths.append(len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return int(round(sum(lengths) / max(len(lengths), 1)))


def results(store: Store, name: str, rows: list[dict[str, Any]], plan_only: bool = False) -> ArtifactRef | Planned:
    """The sweep's results as an artifact: tidy table (parquet + CSV), plots (PNG) and a markdown summary."""
    from sd2_core.plots import draw_all
    from sd2_core.results import results_frame, summary_markdown

    def build(out: Path) -> dict[str, Any]:
        frame = results_frame(rows)
        frame.to_parquet(out / "results.parquet", index=False)
        frame.to_csv(out / "results.csv", index=False)
        plots = draw_all(frame, out / "plots")
        images = {p.stem: f"plots/{p.name}" for p in plots}
        (out / "summary.md").write_text(summary_markdown(frame, f"SD² sweep {name}", images))
        cells = frame.drop_duplicates(["target", "draft", "variant"])
        return {
            "name": name,
            "cells": len(cells),
            "failed": int((cells["status"] == "failed").sum()),
            "rows": len(frame),
            "plots": sorted(images.values()),
        }

    return _stage(store, "results", {"name": name, "rows": rows}, [], build, plan_only)
