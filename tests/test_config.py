"""Typed configs: profiles, normalisation, and errors that name the bad value."""

from __future__ import annotations

import pydantic
import pytest

from sd2_core.config import CellConfig, GridConfig, PruneConfig, SourceSpec, profile
from sd2_core.errors import UserError


def test_profiles() -> None:
    """Each name gives its own settings under its own label; an override changes the field it names and no other."""
    profiles = {name: profile(name) for name in ("smoke", "cpu", "paper")}
    assert all(cell.profile == name for name, cell in profiles.items())
    # the settings differ, not only the labels (the label is part of the digest)
    assert len({cell.model_copy(update={"profile": "cpu"}).digest() for cell in profiles.values()}) == 3
    moved = profile("cpu", store="s3://b/p")
    assert moved.store == "s3://b/p"
    assert moved.model_copy(update={"store": profiles["cpu"].store}) == profiles["cpu"]
    with pytest.raises(UserError, match="'gpu'.*smoke, cpu, paper"):
        profile("gpu")
    with pytest.raises(pydantic.ValidationError):
        profile("cpu", no_such_field=1)


def test_sparsity_is_normalised_and_checked() -> None:
    assert PruneConfig(sparsity="50%").sparsity == "0.5"
    assert PruneConfig(sparsity=0.75).sparsity == "0.75"
    assert PruneConfig(sparsity="2:4").sparsity == "2:4"
    for bad in ("1.5", "0", "4:4", "x"):
        with pytest.raises(pydantic.ValidationError, match=bad.replace(".", r"\.")):
            PruneConfig(sparsity=bad)


def test_config_digest_tracks_content() -> None:
    a = CellConfig()
    assert a.digest() == CellConfig().digest()
    assert a.digest() != CellConfig(prune=PruneConfig(sparsity="2:4")).digest()
    with pytest.raises(pydantic.ValidationError, match="once"):
        CellConfig(sources=(SourceSpec(kind="math"), SourceSpec(kind="math")))
    assert CellConfig.model_validate_json(a.model_dump_json()) == a


def test_grid_variants_default_to_the_profiles_and_named_ones_stay() -> None:
    """The paper's grid adds its 66 % drafts; the laptop profiles keep four cells per draft."""
    small = ["layer-50", "sgpt-50", "sgpt-2:4", "sgpt-75"]
    assert GridConfig().variants == small
    assert GridConfig(profile="smoke").variants == GridConfig(profile="cpu", variants=[]).variants == small
    paper = GridConfig(profile="paper")
    assert paper.variants == ["layer-50", "sgpt-50", "sgpt-2:4", "sgpt-66", "sgpt-75"]
    assert [cell.prune.sparsity for cell in paper.cells()] == ["0.5", "0.5", "2:4", "0.66", "0.75"]
    assert GridConfig(profile="paper", variants=["dense"]).variants == ["dense"]
    assert "paper: layer-50, sgpt-50, sgpt-2:4, sgpt-66, sgpt-75" in GridConfig.model_fields["variants"].description


def test_finetune_paper_settings() -> None:
    """Appendix A: 16k steps at batch 8, twice that at 75 %; 128 x 2048 DCLM calibration; rates from the table."""
    paper = profile("paper")
    assert (paper.finetune.steps, paper.finetune.batch_size, paper.finetune.high_sparsity_steps_factor) == (
        16_000,
        8,
        2,
    )
    assert (paper.finetune.learning_rate, paper.finetune.lr_scale, paper.finetune.warmup_ratio) == (None, 1.0, 0.05)
    calibration = paper.prune.calibration
    assert (calibration.uri, calibration.n_samples, calibration.seq_len) == (
        "hf:mlfoundations/dclm-baseline-1.0",
        128,
        2048,
    )
    assert profile("cpu").finetune.lr_scale == 8.0 and profile("smoke").finetune.learning_rate == 1e-3
    with pytest.raises(pydantic.ValidationError, match="lr_scale"):
        CellConfig.model_validate({"finetune": {"lr_scale": 0}})
