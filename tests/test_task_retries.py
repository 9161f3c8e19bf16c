"""Retries under Prefect's real engine: transient storage/network errors retry, user errors fail at once."""

from __future__ import annotations

import pytest
from prefect import flow, task

from sd2_core.errors import TransientError, UserError
from tasks.stage_tasks import retry_on_transient


def _flaky_task(exc: BaseException, fail_times: int):
    calls = {"n": 0}

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_on_transient, persist_result=False)
    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] <= fail_times:
            raise exc
        return calls["n"]

    return flaky, calls


@pytest.mark.parametrize("exc", [TransientError("s3 PUT timed out"), ConnectionError("reset"), OSError("disk busy")])
def test_transient_errors_are_retried(prefect_api, exc: BaseException) -> None:
    flaky, calls = _flaky_task(exc, fail_times=2)

    @flow
    def run() -> int:
        return flaky()

    assert run() == 3 and calls["n"] == 3


@pytest.mark.parametrize("exc", [UserError("sparsity 1.5 is not in (0, 1)"), RuntimeError("Cholesky failed")])
def test_user_errors_and_bugs_are_not_retried(prefect_api, exc: BaseException) -> None:
    flaky, calls = _flaky_task(exc, fail_times=5)

    @flow
    def run() -> int:
        return flaky()

    with pytest.raises(type(exc)):
        run()
    assert calls["n"] == 1
