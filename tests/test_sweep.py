"""The sweep flow under Prefect's real test harness: failure isolation, results table, rerun of the failed cell only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from prefect_states import artifacts_of, max_overlap, subflow_task_states, task_states_of

from sd2.cli import main
from sd2_core.config import GridConfig
from sd2_core.models import builtin_dir

MEASURES = ("accuracy", "perplexity", "latency")
SHARED = {"materialize-target", "distill-general", "distill-translation", "distill-math", "target-greedy-reference"}
SHARED |= {f"{measure}-target" for measure in MEASURES}
DRAFT_EVALUATION = {f"{measure}-{draft}" for measure in MEASURES for draft in ("one-shot", "sd2")}


def _draft_folder(path: Path, seed: int, with_weights: bool = True) -> Path:
    """A second tiny draft (its own random weights), optionally without its weights file (a broken download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = builtin_dir("tiny-random-llama")
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig.from_pretrained(source)).save_pretrained(path)
    for f in source.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, path / f.name)
    if not with_weights:
        (path / "model.safetensors").rename(path.parent / f"{path.name}.weights")
    return path


def _results(summary: dict) -> pd.DataFrame:
    return pd.read_parquet(Path(summary["results"]) / "results.parquet")


def test_failed_cell_is_isolated_and_rerun_alone(prefect_api, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flows.sweep import grid_of_run, sweep_flow

    good = _draft_folder(tmp_path / "draft-good", seed=7)
    broken = _draft_folder(tmp_path / "draft-broken", seed=8, with_weights=False)
    grid = GridConfig(
        name="failure-test",
        profile="smoke",
        targets=["tiny-random-llama"],
        drafts=["tiny-random-llama", str(good), str(broken)],
        variants=["sgpt-50"],
        store=str(tmp_path / "store"),
        concurrency=2,
    )

    first = sweep_flow(grid=grid, return_state=True)
    assert first.is_failed() and first.message == "1 of 3 cells failed"
    summary = first.result(raise_on_failure=False)
    assert [f["draft"] for f in summary["failed"]] == [str(broken)]
    assert "model.safetensors" in summary["failed"][0]["error"]
    # cells ran side by side, never more than the limit
    cell_runs = {f"{draft}-sgpt-50" for draft in grid.drafts}
    assert max_overlap(summary["flow_run_id"], cell_runs) == 2

    table = _results(summary)
    assert len(summary["rows"]) == 6 and summary["rows"][0]["draft"] == "tiny-random-llama"
    assert len(table) == 6 and set(table["stage"]) == {"one_shot", "sd2"}
    failed_rows = table[table["draft"] == str(broken)]
    assert set(failed_rows["status"]) == {"failed"} and failed_rows["mal"].isna().all()
    assert failed_rows["error"].str.contains("model.safetensors").all()
    done = table[table["status"] == "completed"]
    assert len(done) == 4
    assert done["mal"].between(1.0, 4.0).all()  # smoke profile: k = 3
    assert (done["lossless"] == done["lossless_total"]).all()
    assert done["sparsity"].between(0.49, 0.51).all()
    assert any(c.startswith("mal_") and c not in ("mal_s", "mal_uri") for c in table.columns)
    assert (Path(summary["results"]) / "results.csv").exists()
    assert len(summary["plots"]) == 6 and all(Path(p).stat().st_size > 1000 for p in summary["plots"])

    # remove the cause; the same sweep again recomputes only the failed cell
    (tmp_path / "draft-broken.weights").rename(broken / "model.safetensors")
    # ... named by the earlier run, as a user would from the CLI
    assert grid_of_run(summary["flow_run_name"]) == grid
    assert main(["sweep", "--rerun-failed", summary["flow_run_name"], "--json"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["state"] == "COMPLETED" and second["failed"] == []
    assert len(_results(second)) == 6

    cell_stages = SHARED | DRAFT_EVALUATION | {"prune-0.5", "mal-one-shot", "finetune", "mal-sd2"}  # + another draft
    expected = {
        f"cell-{draft}-sgpt-50": cell_stages if draft == "tiny-random-llama" else cell_stages | {"materialize-draft"}
        for draft in grid.drafts
    }
    runs = subflow_task_states(second["flow_run_id"], {"distill-tiny-random-llama": SHARED, **expected})
    cells = {name: states for name, states in runs.items() if name.startswith("cell-")}
    assert len(cells) == 3
    rerun = cells[f"cell-{broken}-sgpt-50"]
    for name, states in cells.items():
        if name == f"cell-{broken}-sgpt-50":
            assert {n for n, s in states.items() if s != "Cached"} == {
                "materialize-draft",
                "prune-0.5",
                "mal-one-shot",
                "finetune",
                "mal-sd2",
                *DRAFT_EVALUATION,
            }, rerun
            assert all(states[n] == "Cached" for n in SHARED)
        else:
            assert set(states.values()) == {"Cached"}, (name, states)
    distill_runs = [states for name, states in runs.items() if name.startswith("distill-")]
    assert distill_runs and all(set(s.values()) == {"Cached"} for s in distill_runs)
    sweep_states = task_states_of(second["flow_run_id"], {"results", *cell_runs})
    assert sweep_states["results"] == "Completed"  # the table changed: it is rebuilt


def test_variants_dense_layer_and_2_4(prefect_api, tmp_path: Path) -> None:
    """Every variant kind runs; a target that cannot be distilled fails its own cells and no others."""
    from flows.sweep import sweep_flow

    missing_target = str(tmp_path / "no-such-target")
    grid = GridConfig(
        name="variants-test",
        profile="smoke",
        targets=["tiny-random-llama", missing_target],
        drafts=["tiny-random-llama"],
        variants=["dense", "layer-50", "sgpt-2:4"],
        store=str(tmp_path / "store"),
        overrides={"finetune": {"steps": 2}},
    )
    state = sweep_flow(grid=grid, return_state=True)
    assert state.is_failed() and state.message == "3 of 6 cells failed"
    everything = _results(state.result(raise_on_failure=False))
    lost = everything[everything["target"] == missing_target]
    assert len(lost) == 6 and set(lost["status"]) == {"failed"}
    assert lost["error"].str.startswith("distillation of target failed").all()
    assert lost["error"].str.contains("no-such-target").all()
    table = everything[everything["target"] == "tiny-random-llama"].set_index(["variant", "stage"])

    artifacts = artifacts_of(
        state.state_details.flow_run_id, {"sd2-sweep-progress", "sd2-sweep-results", "sd2-sweep-summary"}
    )
    assert artifacts["sd2-sweep-progress"] == 100.0
    assert len(json.loads(artifacts["sd2-sweep-results"])) == 12
    summary_md = artifacts["sd2-sweep-summary"]
    assert "6 cells, 3 completed, 3 failed" in summary_md
    # MAL vs MACs, theoretical factor, MAL with intervals, practical factor, accuracy, perplexity
    assert summary_md.count("data:image/png;base64,") == 6
    assert "Is SD² better than one-shot here?" in summary_md and "paired bootstrap" in summary_md
    assert "results.parquet" in summary_md
    assert set(table["status"]) == {"completed"}
    k = 3
    # the dense draft is the target itself: every draft token is accepted
    assert table.loc[("dense", "one_shot"), "mal"] == pytest.approx(k + 1)
    assert table.loc[("dense", "one_shot"), "sparsity"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc[("layer-50", "one_shot"), "sparsity"] == pytest.approx(0.5, abs=1e-6)  # 1 of 2 blocks gone
    assert table.loc[("layer-50", "sd2"), "sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert table.loc[("sgpt-2:4", "sd2"), "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc[("layer-50", "one_shot"), "c"] < table.loc[("dense", "one_shot"), "c"]
    assert (table["mal"].between(1.0, k + 1)).all()
    assert (table["lossless"] == table["lossless_total"]).all()
    # every draft and the target judged besides MAL: intervals, accuracy (lm-eval), perplexity, measured latency
    assert (table["mal_lo"] <= table["mal"]).all() and (table["mal"] <= table["mal_hi"]).all()
    assert table.loc[("dense", "one_shot"), "mal_lo"] == pytest.approx(k + 1)  # every prompt accepts all: no spread
    sd2_rows = table.xs("sd2", level="stage")
    assert sd2_rows["mal_gain"].notna().all() and (sd2_rows["mal_gain_lo"] <= sd2_rows["mal_gain_hi"]).all()
    assert table["acc_winogrande"].between(0, 1).all() and table["acc_target_average"].notna().all()
    assert (table["perplexity"] > 1).all() and (table["perplexity_target"] > 1).all()
    assert (table["latency_draft_ms"] > 0).all() and (table["improvement_factor_practical"] > 0).all()
    # dense one-shot is the target itself: the same perplexity
    assert table.loc[("dense", "one_shot"), "perplexity"] == pytest.approx(
        table.loc[("dense", "one_shot"), "perplexity_target"]
    )
