"""The sd2 command line: every stage alone, chained through the store, with --json output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sd2.cli import main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # exactly one JSON object on stdout
    return json.loads(out[0])


def test_stages_alone_chain_through_the_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = str(tmp_path / "store")
    common = ["--profile", "smoke", "--store", store, "--json"]
    general = _run(capsys, "distill", "--kind", "general", "--limit", "3", *common)
    math = _run(capsys, "distill", "--kind", "math", "--limit", "2", *common)
    assert general["stage"] == "distill" and general["summary"]["rows"] == 3
    pruned = _run(capsys, "prune", "--sparsity", "2:4", *common)
    assert pruned["summary"]["sparsity"] == pytest.approx(0.5)
    tuned = _run(
        capsys,
        "finetune",
        "--draft",
        f"prune/{pruned['key']}",
        "--distilled",
        f"distill/{general['key']}",
        f"distill/{math['key']}",
        "--mix",
        "general=0.5,math=0.5,translation=0",
        "--steps",
        "2",
        *common,
    )
    assert tuned["summary"]["sparsity"] == pruned["summary"]["sparsity"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Name three colours."}) + "\n" + json.dumps({"turns": ["Hi!", "Count to 3."]}) + "\n"
    )
    mal = _run(
        capsys, "mal", "--draft", tuned["uri"], "--k", "2", "--max-new-tokens", "6", "--prompts", str(prompts), *common
    )
    assert 1.0 <= mal["mal"] <= 3.0
    assert mal["lossless"]["total"] == 3
    assert mal["artifacts"]["draft"] == tuned["uri"]
    # the same command again finds its artifact: same key, nothing rebuilt
    again = _run(capsys, "prune", "--sparsity", "2:4", *common)
    assert again["key"] == pruned["key"] and again["summary"]["seconds"] == pruned["summary"]["seconds"]


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = str(tmp_path / "store")
    assert main(["prune", "--profile", "smoke", "--store", store, "--sparsity", "1.5"]) == 2
    assert "1.5" in capsys.readouterr().err
    assert main(["prune", "--profile", "smoke", "--store", store, "--sparsity", "2:3:4"]) == 2
    assert "2:3:4" in capsys.readouterr().err
    assert main(["mal", "--profile", "smoke", "--store", store, "--draft", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                "--profile",
                "smoke",
                "--store",
                store,
                "--draft",
                "tiny-random-llama",
                "--distilled",
                "distill/0000",
            ]
        )
        == 2
    )
    assert "distill/0000" in capsys.readouterr().err
    assert main(["cell", "--profile", "smoke", "--store", store, "--variant", "sgpt-120"]) == 2
    assert "sgpt-120" in capsys.readouterr().err
    assert main(["cell", "--profile", "smoke", "--store", store, "--variant", "dense", "--sparsity", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["sweep", "--profile", "smoke", "--store", store, "--variants", "sgpt-50", "pruned-lots"]) == 2
    assert "pruned-lots" in capsys.readouterr().err
    assert main(["sweep", "--profile", "smoke", "--store", store, "--set", "finetune.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["sweep", "--profile", "smoke", "--store", store, "--set", "steps=3"]) == 2
    assert "SECTION.FIELD=VALUE" in capsys.readouterr().err
    # nothing was built from the bad inputs (the target model itself is a legitimate artifact)
    assert {p.parent.parent.name for p in Path(store).glob("*/*/manifest.json")} <= {"model"}


def test_console_script_prints_json_only_on_stdout(tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "sd2.cli", "models", "materialize", "tiny-random-llama", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(result["files"])
    from sd2_core.models import load_model, load_tokenizer

    assert load_tokenizer(out).chat_template and load_model(out).config.num_hidden_layers == 2


def test_set_overrides_parse_into_sections() -> None:
    from sd2.cli import _parse_sets

    assert _parse_sets(["finetune.steps=100", "mal.per_category=5", "prune.calibration.uri=/data/c4.txt"]) == {
        "finetune": {"steps": 100},
        "mal": {"per_category": 5},
        "prune": {"calibration": {"uri": "/data/c4.txt"}},
    }


def test_draft_with_another_vocabulary_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sd2_core.models import builtin_dir, load_tokenizer

    draft = tmp_path / "other-vocab"
    assert main(["models", "materialize", "tiny-random-llama", "--out", str(draft)]) == 0
    tokenizer = load_tokenizer(builtin_dir("tiny-random-llama"))
    tokenizer.add_tokens(["<sd2-extra-token>"])
    tokenizer.save_pretrained(draft)
    capsys.readouterr()
    store = str(tmp_path / "store")
    assert main(["mal", "--profile", "smoke", "--store", store, "--draft", str(draft), "--per-category", "1"]) == 2
    assert "different vocabularies" in capsys.readouterr().err
    assert not list(Path(store).glob("mal/*/manifest.json"))
