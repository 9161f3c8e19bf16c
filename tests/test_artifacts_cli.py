"""`sd2 artifacts ls/show` on a local folder and on a real S3 server, human and --json output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3server import s3_server

from sd2.cli import main
from sd2_core.artifacts import produce
from sd2_core.config import CalibrationConfig, PruneConfig
from sd2_core.models import model_recipe
from sd2_core.pruning.oneshot import layer_prune_recipe, prune_recipe
from sd2_core.store import Store


def _fill(store_uri: str) -> dict[str, str]:
    store = Store(store_uri)
    model = produce(store, model_recipe(store, "tiny-random-llama"))
    calibration = CalibrationConfig(n_samples=2, seq_len=16)
    pruned = produce(store, prune_recipe(store, model, PruneConfig(sparsity="2:4", calibration=calibration)))
    layer = PruneConfig(method="layer", sparsity="0.5", calibration=calibration)
    layered = produce(store, layer_prune_recipe(store, model, layer))
    return {"model": model.key, "prune": pruned.key, "layerprune": layered.key}


def _json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def _check(store_uri: str, keys: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    listed = _json(capsys, "artifacts", "ls", "--store", store_uri, "--json")["artifacts"]
    assert {(a["stage"], a["key"]) for a in listed} == {(s, k) for s, k in keys.items()}
    by_stage = {a["stage"]: a for a in listed}
    assert by_stage["prune"]["summary"] == "SparseGPT 2:4: sparsity 0.500"
    assert by_stage["layerprune"]["summary"].startswith("layer pruning 0.5: dropped blocks [")
    assert by_stage["model"]["bytes"] > 100_000 and by_stage["model"]["created"]

    only = _json(capsys, "artifacts", "ls", "--stage", "prune", "--store", store_uri, "--json")["artifacts"]
    assert [a["key"] for a in only] == [keys["prune"]]

    assert main(["artifacts", "ls", "--store", store_uri]) == 0
    human = capsys.readouterr().out.splitlines()
    assert len(human) == 3 and any(line.startswith("layerprune") and keys["layerprune"] in line for line in human)

    shown = _json(capsys, "artifacts", "show", keys["prune"][:8], "--store", store_uri, "--json")
    assert shown["stage"] == "prune" and shown["config"]["sparsity"] == "2:4" and "model.safetensors" in shown["files"]
    same = _json(capsys, "artifacts", "show", f"prune/{keys['prune']}", "--store", store_uri, "--json")
    assert same["digest"] == shown["digest"]

    assert main(["artifacts", "show", "feedbeef", "--store", store_uri]) == 2
    assert "no complete artifact with key 'feedbeef'" in capsys.readouterr().err


def test_artifacts_local(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = str(tmp_path / "store")
    _check(store, _fill(store), capsys)


def test_artifacts_s3(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD2_CACHE", str(tmp_path / "cache"))
    with s3_server("sd2-artifacts-test"):
        store = "s3://sd2-artifacts-test/runs"
        _check(store, _fill(store), capsys)
