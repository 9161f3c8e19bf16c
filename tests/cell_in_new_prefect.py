"""Run the smoke cell once against a brand-new Prefect server and database, in a process of its own.

Prefect keeps process-wide clients (its events worker) bound to the first API a process talks to, so two
test harnesses in one pytest process do not give two clean databases; a child process per database does.
Prints one JSON object: the flow's final state, its result and {task run name: state name}.
"""

from __future__ import annotations

import json
import sys

from prefect.testing.utilities import prefect_test_harness
from prefect_states import task_states

from flows.cell import cell_flow
from sd2_core.config import profile


def main(store: str, expected: list[str]) -> None:
    with prefect_test_harness(server_startup_timeout=120):
        state = cell_flow(config=profile("smoke", store=store), return_state=True)
        outcome = {"state": state.type.value, "message": state.message}
        if state.is_completed():
            outcome["result"] = state.result()
            outcome["tasks"] = task_states(state, set(expected))
    print(json.dumps(outcome, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
