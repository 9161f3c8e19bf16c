"""The artifact store is the only cache: Prefect's database may vanish, and a deleted artifact is rebuilt alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect_states import SMOKE_CELL_TASKS as STAGES

ROOT = Path(__file__).resolve().parents[1]


def _manifests(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.glob("*/*/manifest.json"))}


def _cell_in_new_prefect(store: Path, home: Path) -> dict:
    """The smoke cell in a child process with its own Prefect home, server and database."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cell_in_new_prefect.py"), str(store), *sorted(STAGES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "COMPLETED", outcome["message"]
    return outcome


def test_store_hits_survive_a_new_prefect_database_and_a_deleted_artifact_is_rebuilt_alone(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = _cell_in_new_prefect(store, tmp_path / "prefect-1")
    assert first["tasks"] == {name: "Completed" for name in STAGES}
    built = _manifests(store)
    # model, 3 distill, prune, reference, 2 mal, finetune; accuracy, perplexity, latency of target and both drafts
    assert len(built) == 18

    second = _cell_in_new_prefect(store, tmp_path / "prefect-2")  # a new, empty database: Prefect remembers nothing
    assert second["tasks"] == {name: "Cached" for name in STAGES}
    assert second["result"] == first["result"]
    assert _manifests(store) == built  # nothing was rebuilt or rewritten

    pruned = Path(first["result"]["artifacts"]["prune"])
    shutil.rmtree(pruned)
    third = _cell_in_new_prefect(store, tmp_path / "prefect-3")
    assert third["tasks"] == {name: "Completed" if name == "prune-0.5" else "Cached" for name in STAGES}
    # SparseGPT is deterministic: the rebuilt artifact has the same content, so nothing downstream changed
    rebuilt = _manifests(store)
    assert set(rebuilt) == set(built)
    changed = {name for name in built if rebuilt[name] != built[name]}
    assert changed == {str(pruned.relative_to(store) / "manifest.json")}
