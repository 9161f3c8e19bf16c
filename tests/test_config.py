"""Typed configs: profiles, normalisation, and errors that name the bad value."""

from __future__ import annotations

import pydantic
import pytest

from sd2_core.config import CellConfig, PruneConfig, SourceSpec, profile
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
