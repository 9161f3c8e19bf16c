"""Prefect tasks for the SD² stages: the store is Prefect's cache, so there is one cache and one key.

Each task's cache key is its recipe's artifact key (`sd2_core.artifacts.Recipe`), computed once per task
run by `ArtifactKey`, and the task's result storage is `StoreResults`, a view of the artifact store: a key
is cached exactly when the store holds that artifact complete, and the cached result is read from its
manifest. Prefect's database and its own result files hold nothing a rerun depends on: delete them and
every finished stage is still `Cached`; delete an artifact and exactly that stage runs again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import Task, task
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.logging import get_run_logger
from prefect.serializers import JSONSerializer
from prefect.settings import PREFECT_API_URL

from sd2_core.accuracy import accuracy_recipe
from sd2_core.artifacts import Recipe, produce
from sd2_core.distill import distill_recipe
from sd2_core.errors import TransientError
from sd2_core.finetune import finetune_recipe
from sd2_core.latency import latency_recipe
from sd2_core.mal import mal_recipe, reference_recipe
from sd2_core.models import model_recipe
from sd2_core.perplexity import perplexity_recipe
from sd2_core.pruning.oneshot import layer_prune_recipe, prune_recipe
from sd2_core.reporting import results_recipe
from sd2_core.serve_bench import serve_bench_recipe, served_target_recipe
from sd2_core.store import ArtifactRef, Store

RETRIES = 3
RETRY_DELAYS = [5, 20, 60]
TRANSIENT = (TransientError, ConnectionError, TimeoutError, OSError)

RecipeOf = Callable[..., Recipe]


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


class StoreResults(WritableFileSystem):
    """Prefect result storage that is the artifact store: a result exists iff the artifact is complete.

    Reads answer with the artifact's reference, made from its manifest; writes keep nothing, because the
    stage published the artifact (manifest last) before Prefect asks to persist its result.
    """

    _block_type_name = "sd2 artifact store"
    _description = "The sd2 artifact store seen as Prefect result storage (read-only view of manifests)."

    store: str

    def read_path(self, path: str, _sync: bool = True) -> bytes:
        stage, _, key = path.partition("/")
        store = Store(self.store)
        if not store.is_complete(stage, key):
            raise FileNotFoundError(f"{self.store}: no complete artifact {path}")
        metadata = ResultRecordMetadata(storage_key=path, serializer=JSONSerializer())
        return ResultRecord(metadata=metadata, result=store.ref(stage, key)).serialize()

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        return path


_saved_storage: dict[tuple[str, str], StoreResults] = {}
_storage_lock = threading.Lock()


def store_results(store: str) -> StoreResults:
    """The store's result-storage block, saved once per Prefect API (Prefect requires result storage saved)."""
    uri = Store(store).uri
    api = str(PREFECT_API_URL.value() or "")
    with _storage_lock:
        if (api, uri) not in _saved_storage:
            block = StoreResults(store=uri)
            block.save(f"sd2-store-{hashlib.sha256(uri.encode()).hexdigest()[:12]}", overwrite=True)
            _saved_storage[(api, uri)] = block
        return _saved_storage[(api, uri)]


# The recipe a task run's cache key was computed from, for that run's body: one key computation per run.
_planned = threading.local()


def _recipe(recipe_of: RecipeOf, parameters: dict[str, Any]) -> Recipe:
    # The task function takes (store, **kwargs): Prefect hands its parameters over as {"store", "kwargs"}.
    return recipe_of(Store(parameters["store"]), **parameters.get("kwargs", {}))


@dataclass
class ArtifactKey(CachePolicy):
    """Cache key = the artifact key of the stage's recipe; the recipe is kept for the run's body."""

    recipe_of: RecipeOf | None = None

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw):
        recipe = _recipe(self.recipe_of, inputs)
        _planned.run, _planned.recipe = task_ctx.task_run.id, recipe
        return f"{recipe.stage}/{recipe.key}"


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


def _stage_task(recipe_of: RecipeOf, name: str) -> Task:
    def run(store: str, **kwargs: Any) -> ArtifactRef:
        run_id = TaskRunContext.get().task_run.id
        planned = getattr(_planned, "recipe", None) if getattr(_planned, "run", None) == run_id else None
        recipe = planned or _recipe(recipe_of, {"store": store, "kwargs": kwargs})
        ref = produce(Store(store), recipe, progress=_Progress(name))
        get_run_logger().info("%s -> %s (%.1f s to build)", name, ref.uri, ref.summary.get("seconds", 0.0))
        return ref

    run.__name__ = f"{name}_task"
    return task(
        run,
        name=name,
        cache_policy=ArtifactKey(recipe_of=recipe_of),
        persist_result=True,
        result_serializer="json",
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=retry_on_transient,
    )


materialize_task = _stage_task(model_recipe, "materialize")
distill_task = _stage_task(distill_recipe, "distill")
prune_task = _stage_task(prune_recipe, "prune")
layer_prune_task = _stage_task(layer_prune_recipe, "layer-prune")
finetune_task = _stage_task(finetune_recipe, "finetune")
reference_task = _stage_task(reference_recipe, "reference")
mal_task = _stage_task(mal_recipe, "mal")
serve_target_task = _stage_task(served_target_recipe, "serve-target")
serve_task = _stage_task(serve_bench_recipe, "serve")
accuracy_task = _stage_task(accuracy_recipe, "accuracy")
perplexity_task = _stage_task(perplexity_recipe, "perplexity")
latency_task = _stage_task(latency_recipe, "latency")
results_task = _stage_task(lambda store, **kw: results_recipe(**kw), "results")


def run_stage(task_: Task, run_name: str, store: str, **parameters: Any) -> ArtifactRef:
    """Run a stage task against a store: its result storage is that store, its cache key the artifact key."""
    return task_.with_options(task_run_name=run_name, result_storage=store_results(store))(store=store, **parameters)
