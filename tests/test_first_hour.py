"""What a new user meets first: a smoke sweep that is small, sd2's own lines readable, README figures regenerated."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sd2.cli import _grid, build_parser
from sd2_core.config import PROFILE_MODELS, GridConfig

ROOT = Path(__file__).resolve().parent.parent


def _sweep_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["sweep", *argv])


def test_smoke_grid_uses_the_tiny_model_unless_models_are_named() -> None:
    tiny = "tiny-random-llama"
    assert PROFILE_MODELS["smoke"] == tiny != PROFILE_MODELS["cpu"]
    smoke = _grid(_sweep_args("--profile", "smoke"))
    assert smoke.profile == "smoke" and smoke.targets == [tiny] and smoke.drafts == [tiny]
    models = {c.target for c in smoke.cells()} | {c.draft for c in smoke.cells()}
    assert models == {tiny}
    # the default profile keeps the embedded default model; named models always win
    assert GridConfig().targets == [PROFILE_MODELS["cpu"]]
    named = _grid(_sweep_args("--profile", "smoke", "--targets", "smollm2-135m-instruct"))
    assert named.targets == ["smollm2-135m-instruct"] and named.drafts == [tiny]


def test_a_config_file_without_models_follows_the_profile_given_on_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"name": "mine", "variants": ["sgpt-50"]}))
    grid = _grid(_sweep_args("--config", str(config), "--profile", "smoke"))
    assert (grid.name, grid.targets, grid.variants) == ("mine", ["tiny-random-llama"], ["sgpt-50"])
    config.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        _grid(_sweep_args("--config", str(config)))


def test_cli_against_a_real_server_keeps_stderr_to_sd2s_own_lines(prefect_api, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run(
        [sys.executable, "-m", "sd2.cli", "cell", "--profile", "smoke", "--store", str(tmp_path / "s"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["cell"]["variant"] == "sgpt-50"
    assert "temporary Prefect server" not in done.stderr  # PREFECT_API_URL was used as it is
    assert "HTTP Request" not in done.stderr and "httpx" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"INFO sd2_core\.artifacts: prune \w+: building", done.stderr), done.stderr[-3000:]


def _readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


def test_readme_results_table_is_what_the_named_command_prints() -> None:
    block = _readme_block("results-table")
    command = re.search(r"`(\.venv/bin/python scripts/readme_tables\.py (\S+))`", (ROOT / "README.md").read_text())
    assert command, "README.md does not name the command that renders its results table"
    printed = subprocess.run(
        [sys.executable, "scripts/readme_tables.py", command.group(2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert block == printed
