"""Accuracy on the OpenLLM Leaderboard v1 suite, scored by lm-eval (EleutherAI's lm-evaluation-harness).

WHY lm-eval and not our own scoring: users compare these numbers with the paper's and with leaderboards, which
are lm-eval's. So sd2 writes no metric: each task is lm-eval's own task definition (its prompt, choices,
metrics, filters), run through `lm_eval.simple_evaluate` on lm-eval's Hugging Face model wrapping our model.

Offline (`source: embedded`, the default) only the data location changes: sd2 ships subsets re-shaped into the
schema of the Hugging Face dataset each task reads (sd2_core/data/make_eval_sets.py), and a generated task
config `include`s lm-eval's installed YAML and points it at those files. Where the shipped copy lacks the split
lm-eval draws few-shot examples from (ARC-Challenge and HellaSwag have no train split here), the pool is a set
of items that are never scored; each task's result says so. `source: hub` runs lm-eval's tasks unchanged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd2_core.artifacts import Progress, Recipe, write_json
from sd2_core.errors import UserError
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite: lm-eval's task (or group) and YAML, its standard shots and reported metric, and the
    shipped files (split name -> file in sd2_core/data/embedded/eval, or '../<file>' for sd2_core/data/embedded)."""

    hub_task: str
    yaml: str
    shots: int
    metric: str
    metric_filter: str = "none"
    files: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str | None] = field(default_factory=dict)
    fewshot_note: str = ""


# The OpenLLM Leaderboard v1 suite with its standard shots and metrics.
SUITE: dict[str, SuiteTask] = {
    "arc_challenge": SuiteTask(
        "arc_challenge",
        "arc/arc_challenge.yaml",
        25,
        "acc_norm",
        files={"test": "arc_challenge_test.jsonl", "fewshot": "arc_challenge_fewshot.jsonl"},
        splits={"training_split": None, "validation_split": None, "test_split": "test", "fewshot_split": "fewshot"},
        fewshot_note="no ARC train split is shipped: the 25-shot pool is 50 test items that are never scored",
    ),
    "hellaswag": SuiteTask(
        "hellaswag",
        "hellaswag/hellaswag.yaml",
        10,
        "acc_norm",
        files={"validation": "hellaswag_validation.jsonl", "fewshot": "hellaswag_fewshot.jsonl"},
        splits={
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "fewshot_split": "fewshot",
        },
        fewshot_note="no HellaSwag train split is shipped: the 10-shot pool is 50 validation items that are never "
        "scored; the shipped text joins ctx_a and ctx_b, so ctx_b's first letter is not capitalised as on the hub",
    ),
    "truthfulqa_mc2": SuiteTask(
        "truthfulqa_mc2",
        "truthfulqa/truthfulqa_mc2.yaml",
        0,
        "acc",
        files={"validation": "truthfulqa_validation.jsonl"},
        splits={"training_split": None, "validation_split": "validation", "test_split": None},
    ),
    "winogrande": SuiteTask(
        "winogrande",
        "winogrande/default.yaml",
        5,
        "acc",
        files={"validation": "winogrande_validation.jsonl", "train": "winogrande_train.jsonl"},
        splits={"training_split": "train", "validation_split": "validation"},
        fewshot_note="the 5-shot pool is WinoGrande's train_xs (160 items), a subset of the hub's train_xl",
    ),
    "gsm8k": SuiteTask(
        "gsm8k",
        "gsm8k/gsm8k.yaml",
        5,
        "exact_match",
        metric_filter="strict-match",
        files={"test": "gsm8k_test.jsonl", "train": "../gsm8k_train_subset.jsonl"},
        splits={"training_split": "train", "fewshot_split": "train", "test_split": "test"},
        fewshot_note="the 5-shot pool is the first 256 GSM8K train problems",
    ),
    "mmlu": SuiteTask(
        "mmlu",
        "mmlu/default/_default_template_yaml",
        5,
        "acc",
        files={"test": "mmlu_test.jsonl", "dev": "mmlu_dev.jsonl"},
        splits={"test_split": "test", "fewshot_split": "dev"},
        fewshot_note="shipped: the first 10 test questions of each of the 57 subjects; a limit counts per subject",
    ),
}
SUITE_HELP = ", ".join(SUITE)
SOURCES = ("embedded", "hub")


def check_tasks(tasks: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The task names, validated: each one of the suite, none twice, at least one."""
    tasks = tuple(str(t).strip() for t in tasks)
    unknown = [t for t in tasks if t not in SUITE]
    if unknown:
        raise UserError(f"unknown accuracy task(s) {unknown}; valid: {SUITE_HELP}")
    if not tasks:
        raise UserError(f"no accuracy task given; valid: {SUITE_HELP}")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"accuracy tasks list a task twice: {list(tasks)}")
    return tasks


def check_limit(limit: int | None) -> int | None:
    """None (every shipped item) or a positive number of items per task."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive number of items per task (or None for all), got {limit!r}")
    return limit


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _embedded(name: str) -> Path:
    from sd2_core.data import embedded_path

    return embedded_path(f"eval/{name}")


def _yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML: no second serializer needed


def _local_task(name: str, spec: SuiteTask, files: dict[str, Path]) -> dict[str, Any]:
    """A task config that is lm-eval's own YAML with the data read from local JSON-lines files."""
    return {
        "include": str(_lm_eval_tasks_dir() / spec.yaml),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        **spec.splits,
    }


def _mmlu_configs(spec: SuiteTask, workdir: Path) -> None:
    """One subtask per subject, each lm-eval's own subject YAML on that subject's rows, and the size-weighted group."""
    by_split: dict[str, dict[str, list[str]]] = {}
    for split, file in spec.files.items():
        for line in _embedded(file).read_text(encoding="utf-8").splitlines():
            subject = json.loads(line)["subject"]
            by_split.setdefault(subject, {}).setdefault(split, []).append(line)
    names = []
    for subject, splits in sorted(by_split.items()):
        files = {}
        for split, lines in splits.items():
            files[split] = workdir / f"mmlu_{subject}_{split}.jsonl"
            files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = _local_task(f"sd2_mmlu_{subject}", spec, files)
        config["include"] = str(_lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml")
        config["task_alias"] = subject
        _yaml(workdir / f"sd2_mmlu_{subject}.yaml", config)
        names.append(config["task"])
    group = {
        "group": "sd2_mmlu",
        "task": names,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    _yaml(workdir / "sd2_mmlu.yaml", group)


def write_task_configs(tasks: tuple[str, ...], workdir: Path) -> dict[str, str]:
    """Task configs for the shipped data in `workdir`; {suite name: lm-eval task or group name to run}."""
    names = {}
    for name in tasks:
        spec = SUITE[name]
        if name == "mmlu":
            _mmlu_configs(spec, workdir)
            names[name] = "sd2_mmlu"
            continue
        files = {split: _embedded(file) for split, file in spec.files.items()}
        _yaml(workdir / f"sd2_{name}.yaml", _local_task(f"sd2_{name}", spec, files))
        names[name] = f"sd2_{name}"
    return names


def _task_result(results: dict[str, Any], run_name: str, spec: SuiteTask) -> dict[str, Any]:
    """The reported metric of one task from lm-eval's results, with its standard error and item count."""
    scores = results["results"][run_name]
    key = f"{spec.metric},{spec.metric_filter}"
    if key not in scores:
        raise RuntimeError(f"lm-eval's result for {run_name} has no {key}; it has {sorted(scores)}")
    stderr = scores.get(f"{spec.metric}_stderr,{spec.metric_filter}")
    samples = results.get("n-samples", {})
    if run_name in samples:
        n = samples[run_name]["effective"]
    else:  # a group: the sum over its subtasks
        n = sum(v["effective"] for k, v in samples.items() if k in results.get("group_subtasks", {}).get(run_name, []))
    return {
        "value": float(scores[key]),
        "stderr": None if stderr in (None, "N/A") else float(stderr),
        "metric": spec.metric if spec.metric_filter == "none" else f"{spec.metric} ({spec.metric_filter})",
        "num_fewshot": spec.shots,
        "n": int(n),
    }


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...],
    limit: int | None = None,
    source: str = "embedded",
    batch_size: int = 8,
    progress: Progress | None = None,
    limits: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Each task's reported metric with lm-eval's standard error, and their mean (the OpenLLM-v1 average).

    One `simple_evaluate` per task, each at its standard number of shots. `limit` is lm-eval's: the first N
    items of the scored split (for MMLU, of each subject); `limits` replaces it for the tasks it names.
    """
    tasks, limit = check_tasks(tasks), check_limit(limit)
    limits = {t: check_limit(n) for t, n in (limits or {}).items()}
    if source not in SOURCES:
        raise UserError(f"unknown accuracy source {source!r}; valid: {', '.join(SOURCES)}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out: dict[str, Any] = {"tasks": {}, "source": source, "lm_eval": lm_eval.__version__}
    with tempfile.TemporaryDirectory(prefix="sd2-lm-eval-") as tmp:
        if source == "embedded":
            run_names = write_task_configs(tasks, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)  # our configs only: 15 s less
        else:
            run_names, manager = {name: SUITE[name].hub_task for name in tasks}, TaskManager()
        for done, name in enumerate(tasks):
            spec = SUITE[name]
            if progress is not None:
                progress(done, len(tasks), f"{name} ({spec.shots}-shot)")
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[run_names[name]],
                num_fewshot=spec.shots,
                limit=limits.get(name, limit),
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
            )
            result = {**_task_result(results, run_names[name], spec), "limit": limits.get(name, limit)}
            n = result["n"]
            if source == "embedded" and spec.fewshot_note:
                result["note"] = spec.fewshot_note
            out["tasks"][name] = result
            log.info("%s: %s %.4f ± %s over %d items", name, result["metric"], result["value"], result["stderr"], n)
    if progress is not None:
        progress(len(tasks), len(tasks), "done")
    out["average"] = sum(t["value"] for t in out["tasks"].values()) / len(out["tasks"])
    return out


SUMMARY_FIELDS = ("value", "stderr", "n", "num_fewshot", "limit")


def accuracy_recipe(store: Store, model: ArtifactRef, cfg: Any) -> Recipe:
    """The `accuracy` stage: the suite on one model artifact (the target, a one-shot or an SD² draft)."""
    from sd2_core.models import load_artifact
    from sd2_core.placement import placement_of

    placement = placement_of(cfg)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        loaded, tokenizer = load_artifact(store, model, placement.dtype, placement.device)
        result = evaluate_accuracy(
            loaded, tokenizer, cfg.tasks, cfg.limit, cfg.source, cfg.batch_size, progress, cfg.limits
        )
        write_json(out / "accuracy.json", result)
        return {
            "average": result["average"],
            "tasks": {k: {f: v[f] for f in SUMMARY_FIELDS} for k, v in result["tasks"].items()},
            "source": cfg.source,
        }

    config = {
        **cfg.model_dump(mode="json", exclude={"device", "dtype", "enabled"}),
        "placement": placement.identity,
        "lm_eval": _lm_eval_version(),  # its scoring is part of the result
        **_data_identity(cfg.tasks, cfg.source),
    }
    return Recipe("accuracy", config, (model,), build, code=__name__)


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        raise UserError("lm-eval is not installed; install sd2 with its dependencies (scripts/setup.sh)") from None


def _data_identity(tasks: tuple[str, ...], source: str) -> dict[str, Any]:
    """Digests of the shipped files the tasks read (hub data is identified by lm-eval's task name and version)."""
    from sd2_core.store import file_sha256

    if source != "embedded":
        return {}
    return {"data_sha256": {f: file_sha256(_embedded(f)) for t in tasks for f in SUITE[t].files.values()}}
