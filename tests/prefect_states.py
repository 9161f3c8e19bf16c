"""Read what the Prefect API recorded about a run: the final state of every task run, subflows included."""

from __future__ import annotations

import time
from uuid import UUID


def _final(runs) -> bool:
    return all(r.state is not None and r.state.is_final() for r in runs)


def task_states(flow_state) -> dict[str, str]:
    """Final state name of every task run of one flow run (not its subflows)."""
    return task_states_of(flow_state.state_details.flow_run_id)


def task_states_of(flow_run_id: UUID | str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + 60
    only = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))]))
    with get_client(sync_client=True) as client:
        while True:  # task states reach the API through events: wait until every one has landed
            runs = client.read_task_runs(flow_run_filter=only)
            if (runs and _final(runs)) or time.time() > deadline:
                return {run.name: run.state.name if run.state else "no state" for run in runs}
            time.sleep(0.5)


def subflow_task_states(flow_run_id: UUID | str) -> dict[str, dict[str, str]]:
    """{subflow run name: {task run name: final state}} for every subflow below a flow run, at any depth."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out: dict[str, dict[str, str]] = {}
    frontier = [UUID(str(flow_run_id))]
    with get_client(sync_client=True) as client:
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children]
            for child in children:
                out[child.name] = task_states_of(child.id)
    return out


def max_overlap(flow_run_id: UUID | str, run_names: set[str]) -> int:
    """The most of these task runs that were running at the same moment, from their recorded start and end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))
    runs = [r for r in runs if r.name in run_names]
    assert len(runs) == len(run_names), [r.name for r in runs]
    events = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def artifacts_of(flow_run_id: UUID | str) -> dict[str, object]:
    """{artifact key: data} of the keyed artifacts a flow run created (the newest of each key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))
    return {a.key: a.data for a in sorted(found, key=lambda a: a.created) if a.key}
