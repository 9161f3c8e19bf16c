"""Typed configs: profiles, normalisation, and errors that name the bad value."""

from __future__ import annotations

import pydantic
import pytest

from sd2_core.config import CellConfig, PruneConfig, SourceSpec, profile
from sd2_core.errors import UserError


def test_profiles() -> None:
    smoke, cpu, paper = profile("smoke"), profile("cpu"), profile("paper")
    assert smoke.target == "tiny-random-llama" and cpu.target == "smollm2-135m-instruct"
    assert paper.prune.calibration.n_samples == 128 and paper.prune.calibration.seq_len == 2048
    assert paper.finetune.steps == 16_000 and paper.finetune.batch_size == 8 and paper.mal.per_category is None
    assert profile("cpu", store="s3://b/p").store == "s3://b/p"
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
