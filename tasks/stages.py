"""Prefect tasks for the SD² stages: cache key, retries, logging and progress; the work is in sd2_core.stages.

The cache key of a task is the artifact key its stage would produce (stage, config, input digests,
code version) plus the store. `run_stage` asks the store first: when the artifact is absent the
task refreshes its cache, so a cache record can never stand for an artifact that is gone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from sd2_core import stages
from sd2_core.errors import TransientError
from sd2_core.store import ArtifactRef, Store

RETRIES = 3
RETRY_DELAYS = [5, 20, 60]
TRANSIENT = (TransientError, ConnectionError, TimeoutError, OSError)


def _is_transient(exc: BaseException) -> bool:
    # UserError is a ValueError, never an OSError: a bad input is never retried.
    return isinstance(exc, TRANSIENT) and not isinstance(exc, ValueError)


def retry_on_transient(task_: Task, task_run: Any, state: Any) -> bool:
    """Retry I/O, network and object-storage failures; a user error or a bug fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and _is_transient(exc)


def _plan(stage_fn: Callable[..., Any], parameters: dict[str, Any]) -> stages.Planned:
    # A task's parameters arrive as {"store": ..., "kwargs": {...}} (the wrapper takes **kwargs);
    # run_stage passes them flat.
    args = {k: v for k, v in parameters.items() if k not in ("store", "kwargs")}
    args.update(parameters.get("kwargs", {}))
    return stage_fn(Store(parameters["store"]), **args, plan_only=True)


def _cache_key(stage_fn: Callable[..., Any]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        planned = _plan(stage_fn, parameters)
        store_tag = hashlib.sha256(Store(parameters["store"]).uri.encode()).hexdigest()[:8]
        return f"sd2-{planned.stage}-{planned.key}-{store_tag}"

    return key_fn


class _Progress:
    """Stage progress to the run log (every ~10 %) and to a Prefect progress artifact."""

    def __init__(self, stage: str):
        self.stage = stage
        self.logger = get_run_logger()
        self.artifact_id = None
        self.last_logged = -1.0
        self.last_update = 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        pct = 100.0 * done / max(total, 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(pct, description=f"{self.stage}: {message}")
        elif time.time() - self.last_update > 2 or done >= total:
            update_progress_artifact(self.artifact_id, pct, description=f"{self.stage}: {message}")
            self.last_update = time.time()
        if pct - self.last_logged >= 10 or done >= total:
            self.logger.info("%s %d/%d (%.0f%%) %s", self.stage, done, total, pct, message)
            self.last_logged = pct


def _stage_task(stage_fn: Callable[..., Any], name: str, takes_progress: bool = True) -> Task:
    def run(store: str, **kwargs: Any) -> ArtifactRef:
        logger = get_run_logger()
        if takes_progress:
            kwargs["progress"] = _Progress(name)
        ref = stage_fn(Store(store), **kwargs)
        logger.info("%s -> %s (%.1f s to build)", name, ref.uri, ref.summary.get("seconds", 0.0))
        return ref

    run.__name__ = f"{name}_task"
    return task(
        run,
        name=name,
        cache_key_fn=_cache_key(stage_fn),
        persist_result=True,
        result_serializer="json",
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=retry_on_transient,
    )


materialize_task = _stage_task(stages.materialize_model, "materialize", takes_progress=False)
distill_task = _stage_task(stages.distill, "distill")
prune_task = _stage_task(stages.prune, "prune")
layer_prune_task = _stage_task(stages.layer_prune, "layer-prune")
finetune_task = _stage_task(stages.finetune, "finetune")
reference_task = _stage_task(stages.reference, "reference")
mal_task = _stage_task(stages.mal, "mal")
results_task = _stage_task(stages.results, "results", takes_progress=False)

_STAGE_OF = {
    materialize_task: stages.materialize_model,
    distill_task: stages.distill,
    prune_task: stages.prune,
    layer_prune_task: stages.layer_prune,
    finetune_task: stages.finetune,
    reference_task: stages.reference,
    mal_task: stages.mal,
    results_task: stages.results,
}


def run_stage(task_: Task, run_name: str | None = None, return_state: bool = False, **parameters: Any) -> Any:
    """Call a stage task; refresh its cache when the store lacks the artifact the record points to."""
    planned = _plan(_STAGE_OF[task_], parameters)
    options: dict[str, Any] = {"refresh_cache": not planned.complete}
    if run_name:
        options["task_run_name"] = run_name
    return task_.with_options(**options)(**parameters, return_state=return_state)
