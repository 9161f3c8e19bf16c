"""Self-data distillation: the target answers each instruction in its own words, guided by the reference.

As in self-distillation fine-tuning (SDFT), the target sees the instruction together with the dataset's
reference answer and is asked for its own answer; the training row keeps only the plain instruction and
that answer, so the draft learns the target's distribution rather than the dataset author's. Answers
that talk about the prompt itself ("the reference answer says...") or come out empty are replaced by
the original reference, as SDFT does. So are two more kinds of answer the draft must not learn as the
target's: one cut off at `max_new_tokens` (it would teach the draft to stop mid-sentence — counted as
`truncated`), and a math answer whose final number differs from the reference's (a wrong solution —
counted as `math_mismatch`). Falling back to the reference rather than dropping the row keeps the mix's
proportions and every instruction; the row's `distilled: false` and the counts say how often it happened.
`distill_recipe` is the `distill` stage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sd2_core.artifacts import Progress, Recipe, data_identity, write_json
from sd2_core.config import DistillConfig, SourceSpec
from sd2_core.data.answers import same_final_number
from sd2_core.errors import UserError
from sd2_core.generation import Generator
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)

# The reference comes first and the request last: small targets then answer the request itself instead of
# commenting on the prompt (with SmolLM2-135M an instruction-first layout drew "What's your request?" replies).
DISTILL_TEMPLATE = (
    "Here is a reference answer to a request:\n\n{reference}\n\n"
    "Use the reference answer above for guidance and answer the request below in your own words, "
    "without mentioning the reference answer.\n\n{instruction}"
)

# Phrases that show an answer is about the distillation prompt rather than an answer to the request.
LEAK_MARKERS: tuple[str, ...] = (
    "reference answer",
    "the reference",
    "reference response",
    "your response",
    "my response",
    "your own response",
    "your own answer",
    "original response",
    "original answer",
    "rewrite",
    "rephrase",
    "these directions",
    "now it's your turn",
    "your turn",
    "what's your request",
    "what is your request",
    "what's your question",
    "what is your question",
)


def build_distill_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat prompt that shows the target one row's instruction and reference answer."""
    try:
        instruction, reference = row["instruction"], row["reference"]
    except KeyError as exc:
        raise UserError(
            f"a distillation row needs 'instruction' and 'reference'; row {row.get('id')!r} lacks {exc}"
        ) from None
    return [{"role": "user", "content": DISTILL_TEMPLATE.format(instruction=instruction, reference=reference)}]


def leaks_prompt(text: str, instruction: str = "") -> bool:
    """True when the text mentions the distillation prompt (case-insensitive).

    A marker that already occurs in the instruction does not count: an answer to "Rewrite this sentence"
    may well say "rewrite".
    """
    lowered, asked = text.lower(), instruction.lower()
    return any(marker in lowered and marker not in asked for marker in LEAK_MARKERS)


REASONS = ("empty", "truncated", "leaks", "math_mismatch")


def rejection(row: dict[str, Any], answer: str, finished: bool) -> str | None:
    """Why a distilled answer must not be trained on as the target's (one of REASONS), or None to keep it."""
    if not answer:
        return "empty"
    if not finished:
        return "truncated"
    if leaks_prompt(answer, row["instruction"]):
        return "leaks"
    if row.get("kind") == "math" and not same_final_number(answer, row["reference"]):
        return "math_mismatch"
    return None


def distill_rows(
    generator: Generator,
    rows: list[dict[str, Any]],
    cfg: DistillConfig,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Chat rows (user instruction, assistant answer by the target) for every source row, plus statistics.

    A row's `distilled` is False where the reference was kept (an empty, cut-off, leaking or wrong-math
    answer: see `rejection`). Batch k of the rows is sampled with seed cfg.seed + k * cfg.batch_size, so a
    row's answer does not depend on batches before it. Statistics: `kept` rows carry the target's answer,
    `fallback` rows their reference, and `empty`, `truncated`, `leaks` and `math_mismatch` (which add up to
    `fallback`) say why; `distilled` and `fallbacks` repeat `kept` and `fallback` under the names the cell
    record and `sd2 artifacts` read.
    """
    out: list[dict[str, Any]] = []
    stats = {"rows": len(rows), "kept": 0, "fallback": 0, **dict.fromkeys(REASONS, 0), "generated_tokens": 0}
    started = time.perf_counter()
    total = len(rows)
    if progress:
        progress(0, total, "distilling")
    for start in range(0, total, cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        completions = generator.generate(
            [build_distill_messages(row) for row in batch],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed + start,
        )
        if len(completions) != len(batch):
            raise RuntimeError(f"generator returned {len(completions)} completions for {len(batch)} prompts")
        for row, completion in zip(batch, completions, strict=True):
            stats["generated_tokens"] += completion.n_tokens
            answer = completion.text.strip()
            reason = rejection(row, answer, completion.finished)
            distilled = reason is None
            if distilled:
                stats["kept"] += 1
            else:
                stats["fallback"] += 1
                stats[reason] += 1
            out.append(
                {
                    "id": row["id"],
                    "kind": row["kind"],
                    "messages": [
                        {"role": "user", "content": row["instruction"]},
                        {"role": "assistant", "content": answer if distilled else row["reference"]},
                    ],
                    "distilled": distilled,
                }
            )
        done = start + len(batch)
        if progress:
            progress(done, total, f"distilled {done}/{total} rows")
    stats["distilled"], stats["fallbacks"] = stats["kept"], stats["fallback"]
    seconds = time.perf_counter() - started
    stats["seconds"] = round(seconds, 3)
    stats["tokens_per_second"] = round(stats["generated_tokens"] / seconds, 2) if seconds > 0 else 0.0
    log.info(
        "distilled %d rows: %d by the target; the reference kept for %d empty, %d cut-off, %d leaking and %d "
        "wrong-math answers; %d tokens in %.1f s",
        total, stats["kept"], stats["empty"], stats["truncated"], stats["leaks"], stats["math_mismatch"],
        stats["generated_tokens"], seconds,
    )  # fmt: skip
    return out, stats


def vllm_settings(cfg: DistillConfig, placement) -> dict[str, Any]:
    """The `vllm serve` settings of a distillation (what the pooled server is keyed by)."""
    return {"dtype": placement.dtype_name, "seed": cfg.seed, "tensor_parallel_size": cfg.tensor_parallel_size}


def distill_recipe(store: Store, target: ArtifactRef, source: SourceSpec, cfg: DistillConfig) -> Recipe:
    """The `distill` stage: the target answers one source's instructions in its own words."""
    from sd2_core.data.sources import load_source
    from sd2_core.generation import make_generator, resolve_backend
    from sd2_core.models import load_artifact
    from sd2_core.placement import placement_of

    placement = placement_of(cfg)
    backend = resolve_backend(cfg.backend, placement.device.type)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        rows = load_source(source)
        if backend == "vllm":  # vLLM loads the weights itself: no second copy in this process
            from transformers import GenerationConfig

            from sd2_core.models import load_tokenizer
            from sd2_core.vllm_server import shared_server

            folder = store.local_dir(target)
            generation_config = GenerationConfig.from_pretrained(folder)
            with shared_server(folder, **vllm_settings(cfg, placement)) as server:
                generator = make_generator(
                    "vllm", tokenizer=load_tokenizer(folder), server=server, generation_config=generation_config
                )
                distilled, stats = distill_rows(generator, rows, cfg, progress=progress)
                engine = server.install.label
        else:
            import transformers

            model, tokenizer = load_artifact(store, target, dtype=placement.dtype, device=placement.device)
            generator = make_generator("transformers", model=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            distilled, stats = distill_rows(generator, rows, cfg, progress=progress)
            engine = f"transformers {transformers.__version__}"
        with open(out / "data.jsonl", "w") as fh:
            for row in distilled:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats["engine"] = engine
        write_json(out / "stats.json", stats)
        return {"kind": source.kind, **stats}

    config = {
        "source": source.model_dump(mode="json"),
        # the engine that runs, not 'auto': the two engines sample differently
        "distill": {**cfg.model_dump(mode="json", exclude={"device", "dtype"}), "backend": backend},
        "placement": placement.identity,
        **data_identity(source.uri),
    }
    return Recipe("distill", config, (target,), build, code=__name__)
