"""prefect.yaml: it parses, every entrypoint is a flow whose parameters validate, and `prefect deploy --all` works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sd2_core.config import CellConfig, GridConfig

ROOT = Path(__file__).resolve().parent.parent


def _deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_entrypoints_resolve_and_parameters_validate() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    names = {d["name"] for d in _deployments()}
    assert names == {"sweep", "sweep-weekly", "cell"}
    for deployment in _deployments():
        path, _, _ = deployment["entrypoint"].partition(":")
        assert (ROOT / path).is_file()
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        validated = flow.validate_parameters(deployment.get("parameters", {}))
        if deployment["name"].startswith("sweep"):
            grid = validated.get("grid", flow.parameters.properties["grid"].get("default"))
            grid = GridConfig.model_validate(grid)
            # the deployments run the embedded default grid (only the label may differ)
            assert grid.model_dump(exclude={"name"}) == GridConfig().model_dump(exclude={"name"})
            assert len(grid.cells()) == len(grid.targets) * len(grid.drafts) * len(grid.variants)
        else:
            assert CellConfig.model_validate(validated.get("config", {})) == CellConfig()
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    # the UI form explains itself: every field of the grid has a description
    schema = load_flow_from_entrypoint(str(ROOT / "flows/sweep.py:sweep_flow")).parameters.model_dump()
    fields = schema["definitions"]["GridConfig"]["properties"]
    assert set(fields) == set(GridConfig.model_fields) and all(f.get("description") for f in fields.values())
    weekly = next(d for d in _deployments() if d["name"] == "sweep-weekly")
    assert weekly["schedules"] and weekly["schedules"][0]["active"]


def test_prefect_deploy_all_against_a_real_server(prefect_api, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]

    def run(*args: str) -> str:
        done = subprocess.run([*prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("work-pool", "create", "sd2-process", "--type", "process", "--overwrite")
    run("deploy", "--all")
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert {"sweep", "sweep-weekly", "cell"} <= set(deployments)
        weekly = deployments["sweep-weekly"]
        assert weekly.entrypoint == "flows/sweep.py:sweep_flow" and weekly.work_pool_name == "sd2-process"
        schedules = client.read_deployment_schedules(weekly.id)
        assert [s.schedule.cron for s in schedules] == ["0 3 * * 1"] and schedules[0].active
        assert "grid" in weekly.parameter_openapi_schema["properties"]

        # The server turns the cron schedule into scheduled runs (the scheduler service's own code path;
        # it broke silently with SQLAlchemy 2.1, so the weekly sweep never ran).
        response = client.request(
            "POST", "/deployments/{id}/schedule", path_params={"id": weekly.id}, json={"max_runs": 3}
        )
        assert response.status_code < 300, response.text
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[weekly.id])), limit=10
        )
        starts = sorted(r.expected_start_time for r in runs)
        assert len(runs) == 3 and all(r.state.is_scheduled() for r in runs)
        assert all(t.weekday() == 0 and (t.hour, t.minute) == (3, 0) for t in starts)  # Mondays 03:00 UTC
