"""Decode-step latency: the fixed-context mechanism, the record's structure, compressed formats on CPU, the
practical improvement factor, and the latency stage's caching. No figure is asserted (no timed tests)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from pydantic import ValidationError

from sd2_core.artifacts import produce
from sd2_core.config import LatencyConfig
from sd2_core.errors import UserError
from sd2_core.latency import (
    SEMI_STRUCTURED,
    DecodeStep,
    conversion_plan,
    decode_step_latency,
    format_latencies,
    is_2_4,
    latency_recipe,
    practical_improvement_factor,
    semi_structured_copy,
    sparsity_pattern,
    supported_formats,
)
from sd2_core.models import model_recipe, save_model
from sd2_core.pruning.structure import decoder_linears
from sd2_core.store import Store

QUICK = 0.05  # seconds of blocked_autorange: structure only, never a figure


def _make_2_4(model: torch.nn.Module) -> torch.nn.Module:
    """Zero the first 2 of every 4 input columns of every decoder Linear (a 2:4 model)."""
    with torch.no_grad():
        for linear in decoder_linears(model).values():
            linear.weight.view(-1, 4)[:, :2] = 0.0
    return model


def test_every_repetition_sees_exactly_context_len_cached_positions(tiny_llama) -> None:
    model = tiny_llama()
    step = DecodeStep(model, context_len=12)
    during: list[int] = []
    handle = model.register_forward_hook(lambda *_: during.append(step.cache.get_seq_length()))
    try:
        logits = [step() for _ in range(3)]
    finally:
        handle.remove()
    assert during == [13, 13, 13]  # the timed forward appends one position ...
    assert step.cache.get_seq_length() == 12  # ... and the crop takes it away again
    assert all(torch.equal(logits[0], other) for other in logits[1:])
    # the same step as one forward over context + token: the cache held exactly the 12 context positions
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(model.config.vocab_size, (1, 12), generator=generator)
    with torch.no_grad():
        full = model(input_ids=torch.cat([context, step.token], dim=1)).logits[:, -1:]
    torch.testing.assert_close(logits[0], full, rtol=1e-4, atol=1e-4)


def test_batched_step_keeps_one_row_per_sequence(tiny_llama) -> None:
    step = DecodeStep(tiny_llama(), context_len=5, batch_size=3)
    assert step().shape[:2] == (3, 1)
    assert step.cache.get_seq_length() == 5


def test_latency_record_structure(tiny_llama) -> None:
    record = decode_step_latency(tiny_llama(), context_len=8, min_run_time_s=QUICK, batch_size=2)
    assert record["median_s"] > 0 and record["iqr_s"] >= 0 and record["mean_s"] > 0
    assert record["measurements"] >= 1 and record["runs_per_measurement"] >= 1
    assert record["context_len"] == 8 and record["batch_size"] == 2 and record["min_run_time_s"] == QUICK
    assert record["dtype"] == "float32" and record["device"] == "cpu" and record["device_name"]
    assert record["threads"] == torch.get_num_threads()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_len": 0}, "context_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_run_time_s": 0.0}, "min_run_time_s"),
        ({"min_run_time_s": float("nan")}, "min_run_time_s"),
        ({"context_len": 4096}, "positions"),
    ],
)
def test_bad_requests_are_refused_before_any_forward(tiny_llama, kwargs, message) -> None:
    model = tiny_llama(max_position_embeddings=64)
    args = {"context_len": 8, "min_run_time_s": QUICK, "batch_size": 1, **kwargs}
    with pytest.raises(UserError, match=message):
        decode_step_latency(model, **args)


def test_model_without_decoder_layers_is_refused(tiny_llama) -> None:
    model = tiny_llama()
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(UserError, match="no decoder blocks"):
        decode_step_latency(model, 8, QUICK)
    with pytest.raises(UserError, match="no decoder blocks"):
        decode_step_latency(torch.nn.Linear(4, 4), 8, QUICK)


@pytest.mark.parametrize("field", [{"context_len": 0}, {"min_run_time_s": 0}, {"batch_size": 0}, {"device": "tpu"}])
def test_latency_config_refuses_bad_values(field) -> None:
    with pytest.raises((ValidationError, UserError)):
        LatencyConfig(**field)
    assert LatencyConfig().min_run_time_s == 20.0 and LatencyConfig().context_len == 256


def test_sparsity_pattern_detection(tiny_llama) -> None:
    assert sparsity_pattern(tiny_llama()) == "dense"
    assert sparsity_pattern(_make_2_4(tiny_llama())) == "2:4"
    model = _make_2_4(tiny_llama())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :4] = 1.0  # one group of 4 with 4 non-zeros
    assert sparsity_pattern(model) == "unstructured"
    assert is_2_4(torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
    assert not is_2_4(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert not is_2_4(torch.zeros(2, 6))  # a row that is not whole groups of 4


def test_cpu_has_no_compressed_format_and_says_why(tiny_llama) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        (entry,) = supported_formats("cpu", dtype, "2:4")
        assert entry["format"] == SEMI_STRUCTURED and entry["supported"] is False
        assert "CUDA" in entry["reason"] and "compute capability >= 8.0" in entry["reason"]
    (entry,) = supported_formats("cpu", torch.float32, "unstructured")
    assert "float32" in entry["reason"] and "not 2:4" in entry["reason"]  # every obstacle is named
    model = _make_2_4(tiny_llama())
    with pytest.raises(UserError, match="cannot run here"):
        semi_structured_copy(model)
    dense = {"median_s": 1.0}
    formats = format_latencies(model, dense, context_len=4, min_run_time_s=QUICK, batch_size=1, threads=1)
    assert set(formats) == {SEMI_STRUCTURED}
    assert formats[SEMI_STRUCTURED]["supported"] is False and "median_s" not in formats[SEMI_STRUCTURED]


def test_conversion_plan_names_what_stays_dense(tiny_llama) -> None:
    """The planning half of the CUDA path runs anywhere: which Linears would be compressed, and why not."""
    model = _make_2_4(tiny_llama()).to(torch.bfloat16)
    plan = conversion_plan(model, "cusparselt")
    assert len(plan) == 14 and all(why is None for why in plan.values())  # 2 layers × 7 Linears
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.fill_(1.0)
    plan = conversion_plan(model, "cutlass")
    assert plan["model.layers.1.self_attn.q_proj"] == "not 2:4"
    assert sum(why is None for why in plan.values()) == 13
    assert all("no cusparselt kernel" in why for why in conversion_plan(model.float(), "cusparselt").values())
    with pytest.raises(UserError, match="backend"):
        conversion_plan(model, "mkl")


def test_practical_factor_on_hand_numbers() -> None:
    result = practical_improvement_factor(mal=3.0, k=5, draft_latency_s=0.002, target_latency_s=0.010, c=0.1)
    assert result["c_lat"] == pytest.approx(0.2)
    assert result["improvement_factor_practical"] == pytest.approx(3.0 / (5 * 0.2 + 1))  # 1.5
    assert result["improvement_factor_theoretical"] == pytest.approx(3.0 / (5 * 0.1 + 1))  # 2.0
    assert "c" not in practical_improvement_factor(2.0, 3, 1.0, 1.0)
    for bad in ({"draft_latency_s": 0.0}, {"target_latency_s": -1.0}, {"target_latency_s": float("inf")}):
        with pytest.raises(UserError, match="latency_s"):
            practical_improvement_factor(**{"mal": 2.0, "k": 3, "draft_latency_s": 1.0, "target_latency_s": 1.0, **bad})
    with pytest.raises(UserError, match="k"):
        practical_improvement_factor(2.0, 0, 1.0, 1.0)


def test_latency_stage_builds_once_and_keys_the_machine(tiny_llama, smollm2_tokenizer, tmp_path) -> None:
    save_model(tiny_llama(), smollm2_tokenizer, tmp_path / "tiny")
    store = Store(str(tmp_path / "store"))
    model = produce(store, model_recipe(store, str(tmp_path / "tiny")))
    cfg = LatencyConfig(context_len=16, min_run_time_s=QUICK)
    recipe = latency_recipe(store, model, cfg)
    assert recipe.config["placement"] == {"device": "cpu", "dtype": "float32"}
    assert recipe.config["machine"]["device_name"] and recipe.config["machine"]["threads"] == torch.get_num_threads()
    ref = produce(store, recipe)
    summary = store.manifest("latency", ref.key)["summary"]
    assert summary["median_s"] > 0 and summary["measurements"] >= 1 and summary["context_len"] == 16
    assert summary["device_name"] == recipe.config["machine"]["device_name"]
    assert summary["formats"][SEMI_STRUCTURED]["supported"] is False
    written = json.loads((store.local_dir(ref) / "latency.json").read_text())
    assert written["dense"]["median_s"] == summary["median_s"]  # the measurement is the file's content
    assert written["machine"] == recipe.config["machine"]

    def boom(*_):
        raise AssertionError("a complete latency artifact was rebuilt")

    again = latency_recipe(store, model, cfg)
    assert again.key == recipe.key
    assert produce(store, dataclasses.replace(again, build=boom)).digest == ref.digest  # a store hit

    assert latency_recipe(store, model, cfg.model_copy(update={"dtype": "bfloat16"})).key != recipe.key
    assert latency_recipe(store, model, cfg.model_copy(update={"context_len": 32})).key != recipe.key
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert latency_recipe(store, model, cfg).key != recipe.key  # another thread count, another result
    finally:
        torch.set_num_threads(threads)
