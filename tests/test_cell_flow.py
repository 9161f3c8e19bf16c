"""The smoke cell flow under Prefect's real test harness, on a local store and on a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect_states import SMOKE_CELL_TASKS as STAGES
from prefect_states import task_states
from s3server import s3_server

from sd2_core.config import profile


def _run_twice(store: str) -> tuple[dict, dict[str, str], dict[str, str]]:
    from flows.cell import cell_flow

    config = profile("smoke", store=store)
    first = cell_flow(config=config, return_state=True)
    assert first.is_completed(), first.message
    summary = first.result()
    first_states = task_states(first, STAGES)
    second = cell_flow(config=config, return_state=True)
    assert second.is_completed(), second.message
    assert second.result() == summary
    return summary, first_states, task_states(second, STAGES)


def _check(summary: dict, first: dict[str, str], second: dict[str, str]) -> None:
    assert set(first) == STAGES
    assert all(state == "Completed" for state in first.values()), first
    # the rerun executes no stage: every task is a cache hit
    assert second == {name: "Cached" for name in STAGES}

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
