"""Read what the Prefect API recorded about a run: task-run states, subflows, overlap of runs, artifacts.

Task-run states reach the API through events, so right after a flow returns the API may still lack some runs
or hold them in a non-final state. Every helper therefore waits for what the caller says it expects (task-run
names or a count, subflow names, artifact keys), up to a deadline, and then fails with an AssertionError that
lists what was expected and what was found. Waiting for "whatever is there to be final" is not enough: on a
busy machine the API once held 7 of 9 task runs, all final, and a test read that as the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar
from uuid import UUID

DEADLINE_S = 60.0
POLL_S = 0.25

T = TypeVar("T")
# What a caller expects of a set of task runs: their names (each present), or how many there are (at least).
Expected = Collection[str] | int
# The task runs of one smoke cell (one target, SparseGPT 50 %): the set every cell-flow test expects.
SMOKE_CELL_TASKS = frozenset(
    {
        "materialize-target",
        "distill-general",
        "distill-translation",
        "distill-math",
        "prune-0.5",
        "target-greedy-reference",
        "mal-one-shot",
        "finetune",
        "mal-sd2",
        *(
            f"{measure}-{model}"
            for measure in ("accuracy", "perplexity", "latency")
            for model in ("target", "one-shot", "sd2")
        ),
    }
)


def _poll(read: Callable[[], T], done: Callable[[T], bool], report: Callable[[T], str], timeout: float) -> T:
    """``read()`` until ``done`` holds for its value; past the deadline raise an AssertionError with ``report``."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {report(found)}")
        time.sleep(POLL_S)


def _state_name(run) -> str:
    return run.state.name if run.state is not None else "no state"


def _is_final(run) -> bool:
    return run.state is not None and run.state.is_final()


def _check_expected(expected: Expected) -> Expected:
    if isinstance(expected, str) or not isinstance(expected, (int, Collection)):
        raise TypeError(f"expected task runs are a collection of names or a count, got {expected!r}")
    return expected


def _runs_complete(runs: list, expected: Expected) -> bool:
    """By name: every expected run is present and final (others may still be running). By count: at least that
    many runs are present and every one of them is final."""
    if isinstance(expected, int):
        return len(runs) >= expected and all(_is_final(r) for r in runs)
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    return all(name in by_name and all(_is_final(r) for r in by_name[name]) for name in expected)


def _describe(expected: Expected, runs: list) -> str:
    want = f"{expected} task runs" if isinstance(expected, int) else f"task runs {sorted(expected)}"
    found = {r.name: _state_name(r) for r in runs}
    missing = [] if isinstance(expected, int) else sorted(set(expected) - set(found))
    return f"expected {want}, each in a final state; found {len(runs)}: {found}; missing {missing}"


def _read_task_runs(client, flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_states(flow_state, expected: Expected, timeout: float = DEADLINE_S) -> dict[str, str]:
    """{task run name: state name} of one flow run (not its subflows), once the ``expected`` runs are all final."""
    return task_states_of(flow_state.state_details.flow_run_id, expected, timeout)


def task_states_of(flow_run_id: UUID | str, expected: Expected, timeout: float = DEADLINE_S) -> dict[str, str]:
    """Like `task_states`, from a flow run id. Runs beyond the expected ones are returned too, as they are."""
    from prefect.client.orchestration import get_client

    run_id = UUID(str(flow_run_id))
    _check_expected(expected)
    with get_client(sync_client=True) as client:
        runs = _poll(
            lambda: _read_task_runs(client, run_id),
            lambda found: _runs_complete(found, expected),
            lambda found: f"flow run {run_id}: {_describe(expected, found)}",
            timeout,
        )
    return {run.name: _state_name(run) for run in runs}


def subflow_task_states(
    flow_run_id: UUID | str, expected: Mapping[str, Expected], timeout: float = DEADLINE_S
) -> dict[str, dict[str, str]]:
    """{subflow run name: {task run name: final state}} for every subflow below a flow run, at any depth.

    ``expected`` maps each subflow run name the caller expects to the task runs expected in it; the helper waits
    until all those subflows exist and their expected task runs are final. Subflows beyond them are returned too.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    root = UUID(str(flow_run_id))
    for want in expected.values():
        _check_expected(want)

    def read(client) -> dict[str, list]:
        found: dict[str, list] = {}
        frontier = [root]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children]
            for child in children:
                found[child.name] = _read_task_runs(client, child.id)
        return found

    def done(found: dict[str, list]) -> bool:
        return all(name in found and _runs_complete(found[name], want) for name, want in expected.items())

    def report(found: dict[str, list]) -> str:
        lines = [f"flow run {root}: expected subflows {sorted(expected)}, found {sorted(found)}"]
        for name, want in expected.items():
            if name not in found:
                lines.append(f"  {name}: missing")
            elif not _runs_complete(found[name], want):
                lines.append(f"  {name}: {_describe(want, found[name])}")
        return "\n".join(lines)

    with get_client(sync_client=True) as client:
        found = _poll(lambda: read(client), done, report, timeout)
    return {name: {run.name: _state_name(run) for run in runs} for name, runs in found.items()}


def max_overlap(flow_run_id: UUID | str, run_names: set[str], timeout: float = DEADLINE_S) -> int:
    """The most of these task runs that were running at the same moment, from their recorded start and end.

    Waits until every named run is final with both times recorded.
    """
    from prefect.client.orchestration import get_client

    run_id = UUID(str(flow_run_id))

    def timed(runs: list) -> list:
        return [r for r in runs if r.name in run_names and _is_final(r) and r.start_time and r.end_time]

    with get_client(sync_client=True) as client:
        runs = _poll(
            lambda: _read_task_runs(client, run_id),
            lambda found: {r.name for r in timed(found)} == set(run_names),
            lambda found: (
                f"flow run {run_id}: expected task runs {sorted(run_names)} final with start and end times; "
                f"found {[(r.name, _state_name(r), r.start_time, r.end_time) for r in found]}"
            ),
            timeout,
        )
    runs = timed(runs)
    assert len(runs) == len(run_names), f"task run names are not unique: {sorted(r.name for r in runs)}"
    events = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def artifacts_of(flow_run_id: UUID | str, expected_keys: Collection[str], timeout: float = DEADLINE_S) -> dict:
    """{artifact key: data} of the keyed artifacts a flow run created (the newest of each key), once every
    expected key is there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    if isinstance(expected_keys, str):
        raise TypeError(f"expected artifact keys are a collection of keys, got the string {expected_keys!r}")
    run_id = UUID(str(flow_run_id))
    only = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        found = _poll(
            lambda: client.read_artifacts(flow_run_filter=only),
            lambda arts: set(expected_keys) <= {a.key for a in arts},
            lambda arts: (
                f"flow run {run_id}: expected artifact keys {sorted(expected_keys)}, "
                f"found {sorted({a.key for a in arts if a.key})}"
            ),
            timeout,
        )
    return {a.key: a.data for a in sorted(found, key=lambda a: a.created) if a.key}
