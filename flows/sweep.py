"""The sweep: every target × draft × variant cell as a subflow, distillation shared per target, one results table.

A failing cell never stops the others: the sweep finishes them, writes the table with the failed cells marked, and
ends Failed with a message that counts them. Running the same grid again recomputes only failed or changed cells,
because every finished stage is a cache hit.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cell import cell_flow, distill_flow
from sd2_core.config import CellConfig, GridConfig
from sd2_core.placement import check_placements
from sd2_core.reporting import cell_rows, failed_rows, json_rows, results_frame, summary_markdown
from sd2_core.store import Store
from tasks.stage_tasks import results_task, run_stage

MAX_THREADS = 64  # the grid's `concurrency` (≤ 64) decides how many cells actually run at once


@task(
    name="run-cell",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
    task_run_name="{config.draft}-{config.variant}",
)
def run_cell(config: CellConfig) -> dict[str, Any]:
    """One cell as a subflow; its stage tasks carry the caching and the retries."""
    return cell_flow(config)


def _run_cells(cells: list[CellConfig], concurrency: int, on_done) -> list[tuple[Any, str | None]]:
    """Submit cells, never more than `concurrency` in flight; return (summary, error) per cell, in order."""
    pending = list(enumerate(cells))
    running: dict[PrefectFuture, int] = {}
    outcomes: dict[int, tuple[Any, str | None]] = {}
    while pending or running:
        while pending and len(running) < concurrency:
            index, cell = pending.pop(0)
            running[run_cell.submit(cell)] = index
        done, _ = wait(list(running), timeout=1.0)
        for future in done:
            index = running.pop(future)
            result = future.result(raise_on_failure=False)  # the in-memory result (or the exception)
            if isinstance(result, BaseException):
                outcomes[index] = (None, f"{type(result).__name__}: {result}")
            else:
                outcomes[index] = (result, None)
            on_done(cells[index], outcomes[index][1])
    return [outcomes[i] for i in range(len(cells))]


@flow(name="sd2-sweep", task_runner=ThreadPoolTaskRunner(max_workers=MAX_THREADS))
def sweep_flow(grid: GridConfig = GridConfig()) -> Any:  # noqa: B008 - the UI form's default
    """Run a grid of SD² cells; publish the results table, plots and a summary; fail if any cell failed."""
    started = time.time()
    logger = get_run_logger()
    cells = grid.cells()
    for cell in cells:
        check_placements(cell)
    logger.info("sweep %s: %d cells (%s), concurrency %d", grid.name, len(cells), grid.profile, grid.concurrency)
    progress = create_progress_artifact(0.0, key="sd2-sweep-progress", description=f"sweep {grid.name}: 0 cells done")

    # Shared by every cell of a target: computed once, before its cells. A target that cannot be
    # distilled fails its own cells (with that error) and no others.
    target_errors: dict[str, str] = {}
    for target in grid.targets:
        state = distill_flow.with_options(flow_run_name=f"distill-{target}")(grid.base_cell(target), return_state=True)
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            target_errors[target] = f"distillation of target failed: {type(error).__name__}: {error}"
            logger.error("target %s: %s", target, target_errors[target])

    finished = {"n": 0, "failed": 0}

    def on_done(cell: CellConfig, error: str | None) -> None:
        finished["n"] += 1
        finished["failed"] += int(error is not None)
        logger.info(
            "cell %s/%s/%s: %s (%d/%d done)",
            cell.target,
            cell.draft,
            cell.variant,
            "failed: " + error if error else "completed",
            finished["n"],
            len(cells),
        )
        update_progress_artifact(
            progress,
            100.0 * finished["n"] / len(cells),
            description=f"sweep {grid.name}: {finished['n']}/{len(cells)} cells done, {finished['failed']} failed",
        )

    outcomes = iter(_run_cells([c for c in cells if c.target not in target_errors], grid.concurrency, on_done))
    rows: list[dict[str, Any]] = []
    for cell in cells:  # grid order, whatever order the cells finished in
        if cell.target in target_errors:
            on_done(cell, target_errors[cell.target])
            rows += failed_rows(cell, target_errors[cell.target])
            continue
        result, error = next(outcomes)
        rows += failed_rows(cell, error) if error else cell_rows(result)
    ref = run_stage(results_task, "results", store=grid.store, name=grid.name, rows=rows)
    _publish_prefect_artifacts(grid, rows, ref)
    failed = [r for r in rows if r["status"] == "failed" and r["stage"] == "one_shot"]
    summary = {
        "sweep": grid.name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "cells": len(cells),
        "failed": [
            {"target": r["target"], "draft": r["draft"], "variant": r["variant"], "error": r["error"]} for r in failed
        ],
        "results": ref.uri,
        "plots": [f"{ref.uri}/{p}" for p in ref.summary.get("plots", [])],
        "seconds": round(time.time() - started, 1),
        "rows": json_rows(rows),
    }
    if failed:
        return Failed(message=f"{len(failed)} of {len(cells)} cells failed", data=summary)
    return summary


def _publish_prefect_artifacts(grid: GridConfig, rows: list[dict[str, Any]], ref) -> None:
    """The results as a Prefect table artifact and a markdown summary with the plots embedded."""
    frame = results_frame(rows)
    create_table_artifact(json_rows(rows), key="sd2-sweep-results", description=f"SD² sweep {grid.name}: {ref.uri}")
    store = Store(grid.store)
    folder = store.local_dir(ref)
    images = {
        p.stem: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
        for p in sorted((folder / "plots").glob("*.png"))
    }
    files = [f"- `{ref.uri}/{name}`" for name in ("results.parquet", "results.csv", *ref.summary.get("plots", []))]
    text = summary_markdown(frame, f"SD² sweep {grid.name}", images) + "\n## Files\n\n" + "\n".join(files) + "\n"
    create_markdown_artifact(text, key="sd2-sweep-summary", description=f"SD² sweep {grid.name}")


def grid_of_run(run: str) -> GridConfig:
    """The grid an earlier sweep ran with, found by flow run id or name (the newest run of that name)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from sd2_core.errors import UserError

    try:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run)]))
    except ValueError:
        run_filter = FlowRunFilter(name=FlowRunFilterName(any_=[run]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=run_filter, sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs:
        raise UserError(f"no flow run named or with id {run!r} on this Prefect API; `prefect flow-run ls` lists them")
    if "grid" not in runs[0].parameters:
        raise UserError(f"flow run {run!r} is not a sweep (its parameters are {sorted(runs[0].parameters)})")
    return GridConfig.model_validate(runs[0].parameters["grid"])
