"""Accuracy through lm-eval on the shipped subsets: lm-eval's own task definitions, our data, offline."""

from __future__ import annotations

import json

import pytest

from sd2_core.accuracy import SUITE, accuracy_recipe, evaluate_accuracy, write_task_configs
from sd2_core.artifacts import produce
from sd2_core.config import OPENLLM_V1, AccuracyConfig
from sd2_core.errors import UserError
from sd2_core.models import model_recipe
from sd2_core.store import Store


def test_suite_is_openllm_v1_with_its_shots():
    assert tuple(SUITE) == OPENLLM_V1
    shots = {name: spec.shots for name, spec in SUITE.items()}
    assert shots == {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5, "mmlu": 5}


def test_configs_are_lm_evals_own_tasks_on_the_shipped_files(tmp_path):
    """The generated task renders our rows with lm-eval's own prompt, choices and target."""
    from lm_eval.tasks import TaskManager

    names = write_task_configs(("arc_challenge", "hellaswag", "winogrande"), tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = manager.load_task_or_group(list(names.values()))
    arc = tasks["sd2_arc_challenge"]
    doc = next(iter(arc.test_docs()))
    first = json.loads(open_embedded("arc_challenge_test.jsonl").splitlines()[0])
    assert arc.doc_to_text(doc) == f"Question: {first['question']}\nAnswer:"
    assert arc.doc_to_choice(doc) == first["choices"]["text"]
    assert arc.doc_to_target(doc) == first["choices"]["label"].index(first["answerKey"])
    assert len(list(arc.fewshot_docs())) == 50  # the pool is apart from the scored items
    scored = {d["id"] for d in arc.test_docs()}
    assert not scored & {d["id"] for d in arc.fewshot_docs()}
    hella = tasks["sd2_hellaswag"]
    hdoc = next(iter(hella.validation_docs()))
    assert hella.doc_to_text(hdoc).startswith("Roof shingle removal: A man is sitting on a roof.")
    assert len(hella.doc_to_choice(hdoc)) == 4
    wino = tasks["sd2_winogrande"]
    assert len(list(wino.training_docs())) == 160


def open_embedded(name: str) -> str:
    from sd2_core.data import embedded_path

    return embedded_path(f"eval/{name}").read_text(encoding="utf-8")


def test_every_task_runs_offline_on_a_tiny_model(tiny_llama, smollm2_tokenizer):
    result = evaluate_accuracy(tiny_llama(), smollm2_tokenizer, OPENLLM_V1, limit=1, batch_size=4)
    assert set(result["tasks"]) == set(OPENLLM_V1)
    for name, task in result["tasks"].items():
        assert 0.0 <= task["value"] <= 1.0, name
        assert task["num_fewshot"] == SUITE[name].shots
        assert task["n"] == (57 if name == "mmlu" else 1), name
    assert "never scored" in result["tasks"]["arc_challenge"]["note"]
    assert result["average"] == pytest.approx(sum(t["value"] for t in result["tasks"].values()) / 6)


def test_recipe_publishes_and_is_cached(tmp_path):
    store = Store(str(tmp_path / "store"))
    model = produce(store, model_recipe(store, "tiny-random-llama"))
    cfg = AccuracyConfig(tasks=("winogrande",), limit=3)
    ref = produce(store, accuracy_recipe(store, model, cfg))
    assert ref.summary["tasks"]["winogrande"]["n"] == 3
    assert ref.summary["tasks"]["winogrande"]["stderr"] > 0 or ref.summary["tasks"]["winogrande"]["value"] in (0, 1)
    saved = json.loads(store.read_text(ref, "accuracy.json"))
    assert saved["tasks"]["winogrande"]["value"] == ref.summary["tasks"]["winogrande"]["value"]
    assert produce(store, accuracy_recipe(store, model, cfg)).uri == ref.uri
    other = accuracy_recipe(store, model, AccuracyConfig(tasks=("winogrande",), limit=4))
    assert other.key != accuracy_recipe(store, model, cfg).key


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tasks": ["arc_easy"]}, "valid: arc_challenge, hellaswag"),
        ({"tasks": []}, "no accuracy task"),
        ({"tasks": ["mmlu", "mmlu"]}, "twice"),
        ({"limit": 0}, "positive number"),
        ({"limit": -3}, "positive number"),
    ],
)
def test_bad_settings_name_what_is_valid(settings, message):
    with pytest.raises(ValueError, match=message):
        AccuracyConfig(**settings)


def test_bad_arguments_of_the_function(tiny_llama, smollm2_tokenizer):
    with pytest.raises(UserError, match="valid: embedded, hub"):
        evaluate_accuracy(tiny_llama(), smollm2_tokenizer, ["gsm8k"], source="web")
    with pytest.raises(UserError, match="unknown accuracy task"):
        evaluate_accuracy(tiny_llama(), smollm2_tokenizer, ["boolq"])
