"""The smoke cell flow under Prefect's real test harness, on a local store and on a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3server import s3_server

from sd2_core.config import profile


def _task_states(flow_state) -> dict[str, str]:
    """Final state name of every task run of a flow run, as the Prefect API records them."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while True:  # task states reach the API through events: wait until every one has landed
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if (runs and all(r.state is not None and r.state.is_final() for r in runs)) or time.time() > deadline:
                return {run.name: run.state.name if run.state else "no state" for run in runs}
            time.sleep(0.5)


def _run_twice(store: str) -> tuple[dict, dict[str, str], dict[str, str]]:
    from flows.cell import cell_flow

    config = profile("smoke", store=store)
    first = cell_flow(config=config, return_state=True)
    assert first.is_completed(), first.message
    summary = first.result()
    first_states = _task_states(first)
    second = cell_flow(config=config, return_state=True)
    assert second.is_completed(), second.message
    assert second.result() == summary
    return summary, first_states, _task_states(second)


def _check(summary: dict, first: dict[str, str], second: dict[str, str]) -> None:
    stages = {
        "materialize-target",
        "distill-general",
        "distill-translation",
        "distill-math",
        "prune-0.5",
        "target-greedy-reference",
        "mal-one-shot",
        "finetune",
        "mal-sd2",
    }
    assert set(first) == stages
    assert all(state == "Completed" for state in first.values()), first
    # the rerun executes no stage: every task is a cache hit
    assert second == {name: "Cached" for name in stages}

    k = summary["k"]
    for stage in ("one_shot", "sd2"):
        assert 1.0 <= summary["mal"][stage]["overall"] <= k + 1
        assert summary["mal"][stage]["per_category"]
        lossless = summary["lossless"][stage]
        assert lossless["total"] >= 6 and lossless["identical"] == lossless["total"]
    assert summary["sparsity"]["pruned"] == pytest.approx(0.5, abs=0.01)
    assert summary["sparsity"]["finetuned"] == summary["sparsity"]["pruned"]
    assert 0 < summary["macs_per_token"]["draft"] < summary["macs_per_token"]["target"]
    assert set(summary["artifacts"]) >= {"prune", "finetune", "mal_one_shot", "mal_sd2"}
    assert all(seconds is not None for seconds in summary["timings"].values())


def test_smoke_cell_local_store(prefect_api, tmp_path: Path) -> None:
    store = tmp_path / "store"
    summary, first, second = _run_twice(str(store))
    _check(summary, first, second)
    assert Path(summary["artifacts"]["mal_sd2"], "manifest.json").exists()


def test_smoke_cell_s3_store(prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD2_CACHE", str(tmp_path / "cache"))
    with s3_server("sd2-cell-test"):
        summary, first, second = _run_twice("s3://sd2-cell-test/smoke")
        _check(summary, first, second)
        assert summary["artifacts"]["mal_sd2"].startswith("s3://sd2-cell-test/smoke/mal/")
