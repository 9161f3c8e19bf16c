"""Device and precision: resolution and refusals, and every stage of a cell on cpu/float32 and cpu/bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd2_core.artifacts import produce
from sd2_core.config import CellConfig, GridConfig, profile, with_placement
from sd2_core.errors import UserError
from sd2_core.placement import Placement, check_fits, check_placements, resolve_placement
from sd2_core.store import Store

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_the_cpu_in_float32_without_cuda_and_explicit_choices_hold() -> None:
    if NO_CUDA:
        assert resolve_placement("auto", "auto") == Placement(torch.device("cpu"), torch.float32)
    assert resolve_placement("CPU", "bfloat16") == Placement(torch.device("cpu"), torch.bfloat16)
    assert resolve_placement("cpu", "float16").identity == {"device": "cpu", "dtype": "float16"}
    # the GPU's index is where, not what: results from cuda:0 and cuda:1 share a cache key
    assert Placement(torch.device("cuda", 1), torch.bfloat16).identity == {"device": "cuda", "dtype": "bfloat16"}


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "mps", ""])
def test_bad_device_names_are_refused_with_the_valid_forms(device: str) -> None:
    with pytest.raises(UserError, match="valid: auto .*cpu, cuda or cuda:N"):
        resolve_placement(device)
    with pytest.raises(ValueError, match="is not valid"):
        CellConfig.model_validate({"mal": {"device": device}})


def test_bad_dtype_is_refused() -> None:
    with pytest.raises(UserError, match="dtype 'fp8' is not valid; valid: auto, float32, bfloat16, float16"):
        resolve_placement("cpu", "fp8")


@pytest.mark.skipif(not NO_CUDA, reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused_before_anything_loads(device: str) -> None:
    with pytest.raises(UserError, match=f"device '{device}' needs CUDA, and this machine has no CUDA device"):
        resolve_placement(device, "bfloat16")
    with pytest.raises(UserError, match="needs CUDA"):
        check_placements(with_placement(profile("smoke"), device=device))


def test_a_model_that_cannot_fit_is_refused_with_the_estimate() -> None:
    with pytest.raises(UserError, match=r"needs about 260.77 GiB on cpu \(70000 M parameters × 4 bytes \(float32\)\)"):
        check_fits("target", 70_000_000_000, torch.float32, [torch.device("cpu")])
    check_fits("draft", 1_000, torch.float32, [torch.device("cpu")])  # a small one passes


def test_profiles_place_their_stages() -> None:
    for name in ("smoke", "cpu"):
        cell = profile(name)
        assert {(getattr(cell, s).device, getattr(cell, s).dtype) for s in ("distill", "prune", "finetune", "mal")} == {
            ("cpu", "float32")
        }
    paper = profile("paper")
    assert (paper.prune.device, paper.finetune.dtype, paper.mal.device) == ("cuda", "bfloat16", "cuda")
    assert paper.finetune.micro_batch_size == 1 and paper.finetune.gradient_checkpointing


def test_one_flag_places_every_stage_of_a_cell_and_of_a_grid() -> None:
    cell = with_placement(profile("smoke"), device="auto", dtype="bfloat16")
    assert {(cell.distill.device, cell.prune.dtype, cell.finetune.dtype, cell.mal.device)} == {
        ("auto", "bfloat16", "bfloat16", "auto")
    }
    grid = GridConfig(profile="smoke", overrides={"mal": {"dtype": "bfloat16"}, "prune": {"device": "cpu"}})
    (only, *_) = grid.cells()
    assert only.mal.dtype == "bfloat16" and only.prune.device == "cpu" and only.finetune.dtype == "float32"


def _cell_stages(store: Store, cell: CellConfig) -> dict[str, dict]:
    """Every stage of one smoke cell through the recipes (no Prefect), returning each artifact's manifest."""
    from sd2_core.distill import distill_recipe
    from sd2_core.finetune import finetune_recipe
    from sd2_core.mal import mal_recipe, reference_recipe
    from sd2_core.models import model_recipe
    from sd2_core.pruning.oneshot import prune_recipe

    model = produce(store, model_recipe(store, cell.target))
    distilled = [produce(store, distill_recipe(store, model, source, cell.distill)) for source in cell.sources]
    pruned = produce(store, prune_recipe(store, model, cell.prune))
    tuned = produce(store, finetune_recipe(store, pruned, distilled, cell.finetune))
    reference = produce(store, reference_recipe(store, model, cell.mal))
    mal = produce(store, mal_recipe(store, model, tuned, reference, cell.mal))
    refs = {"distill": distilled[0], "prune": pruned, "finetune": tuned, "reference": reference, "mal": mal}
    return {name: {**store.manifest(ref.stage, ref.key), "key": ref.key} for name, ref in refs.items()}


def test_every_stage_runs_in_bfloat16_on_cpu_and_keys_its_result_apart(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    fp32 = _cell_stages(store, profile("smoke"))
    bf16 = _cell_stages(store, with_placement(profile("smoke"), dtype="bfloat16"))
    for stage in fp32:
        assert fp32[stage]["config"]["placement"] == {"device": "cpu", "dtype": "float32"}, stage
        assert bf16[stage]["config"]["placement"] == {"device": "cpu", "dtype": "bfloat16"}, stage
        assert fp32[stage]["key"] != bf16[stage]["key"], f"{stage}: precision is not part of the key"
    assert bf16["prune"]["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert bf16["finetune"]["summary"]["sparsity"] == pytest.approx(bf16["prune"]["summary"]["sparsity"])
    assert bf16["mal"]["summary"]["mal"] >= 1.0


@pytest.mark.skipif(not NO_CUDA, reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("command", [["cell"], ["sweep"], ["prune", "--sparsity", "0.5"]])
def test_the_cli_refuses_cuda_here_before_starting_anything(command: list[str], tmp_path: Path) -> None:
    import subprocess
    import sys

    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "sd2.cli", *command, "--profile", "smoke", "--device", "cuda", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "device 'cuda' needs CUDA, and this machine has no CUDA device" in proc.stderr
    assert "Prefect server" not in proc.stderr and "Traceback" not in proc.stderr
    assert not list(store.glob("*/*/manifest.json"))  # nothing was built, not even the model
