"""vLLM for real: a `vllm serve` of tiny random Llamas (real SmolLM2 tokenizer) and of SmolLM2 itself, started by
sd2 on 127.0.0.1. Without vLLM these tests skip with one line; in CI (CI=true) a missing vLLM fails them.

The refusals of a bad target/draft pair need no vLLM and always run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd2_core.errors import UserError
from sd2_core.models import save_model
from sd2_core.serve_bench import check_pair
from sd2_core.vllm_server import find_vllm


@pytest.fixture(scope="module")
def vllm_installed():
    """vLLM on for this module (conftest turns it off for every other test), or a skip / a CI failure."""
    saved = os.environ.pop("SD2_VLLM", None)
    if saved is not None and saved != "off":
        os.environ["SD2_VLLM"] = saved
    try:
        if find_vllm() is None:
            if os.environ.get("CI", "").lower() in ("1", "true"):
                pytest.fail("CI runs the vLLM tests for real, but vLLM is not installed: bash scripts/setup_vllm.sh")
            pytest.skip("vLLM not installed (bash scripts/setup_vllm.sh)")
        yield
    finally:
        if saved is not None:
            os.environ["SD2_VLLM"] = saved


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama, smollm2_tokenizer) -> dict[str, Path]:
    """A tiny target, a smaller tiny draft (same vocabulary), each a saved HF folder."""
    root = tmp_path_factory.mktemp("vllm-models")
    out = {}
    for name, model in (
        ("target", tiny_llama(seed=1, num_hidden_layers=4)),
        ("draft", tiny_llama(seed=1, num_hidden_layers=2)),
    ):
        save_model(model, smollm2_tokenizer, root / name)
        out[name] = root / name
    return out


# ---------------------------------------------------------------- refusals before any model loads (no vLLM needed)


@pytest.mark.parametrize("k", [0, 17, -1])
def test_k_outside_1_to_16_is_refused(folders, k):
    with pytest.raises(UserError, match=rf"k .* 1\.\.16, got {k}"):
        check_pair(folders["target"], folders["draft"], k)


def test_a_draft_larger_than_its_target_is_refused(folders):
    with pytest.raises(UserError, match="more than its target"):
        check_pair(folders["draft"], folders["target"], 5)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, folders, tiny_llama, smollm2_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)} | {"<unk>": 64}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<unk>")
    other.chat_template = smollm2_tokenizer.chat_template
    save_model(tiny_llama(seed=2, vocab_size=65, num_hidden_layers=1), other, tmp_path / "other")
    assert AutoTokenizer.from_pretrained(tmp_path / "other").get_vocab() == other.get_vocab()
    with pytest.raises(UserError, match="different vocabularies"):
        check_pair(folders["target"], tmp_path / "other", 5)


# ---------------------------------------------------------------- vLLM serving


def _greedy_transformers(folder: Path, contexts: list[list[int]], max_new: int, eos: set[int]) -> list[list[int]]:
    from sd2_core.models import load_model
    from sd2_core.specdec import greedy_generate_batch

    return greedy_generate_batch(load_model(folder), contexts, max_new, eos)


def _contexts(tokenizer, n: int) -> list[list[int]]:
    from sd2_core.chat import chat_input_ids
    from sd2_core.data.prompts import load_prompts

    items = load_prompts("specbench", per_category=max(1, n // 6 + 1))[:n]
    return [chat_input_ids(tokenizer, [{"role": "user", "content": item.turns[0]}]) for item in items]


def test_vllm_and_transformers_greedy_agree_on_a_tiny_model(vllm_installed, folders, smollm2_tokenizer):
    from sd2_core.chat import eos_ids
    from sd2_core.vllm_server import vllm_server

    contexts = _contexts(smollm2_tokenizer, 6)
    eos = eos_ids(smollm2_tokenizer, None)
    expected = _greedy_transformers(folders["target"], contexts, 16, set(eos))
    with vllm_server(folders["target"], dtype="float32") as server:
        bodies = [
            {"prompt": ids, "max_tokens": 16, "temperature": 0.0, "stop_token_ids": eos, "return_token_ids": True}
            for ids in contexts
        ]
        served = [c["token_ids"] for c in server.complete(bodies, parallel=len(bodies))]
        health = server.url
    identical = sum(a == b for a, b in zip(served, expected, strict=True))
    print(json.dumps({"tiny_identical": identical, "of": len(contexts)}))
    assert identical == len(contexts), (served, expected)
    import httpx

    with pytest.raises(httpx.TransportError):
        httpx.get(f"{health}/health", timeout=2.0, trust_env=False)  # the server stopped with the block


def test_distillation_on_vllm_is_seeded_and_counts_cut_off_answers(vllm_installed, folders, smollm2_tokenizer):
    from sd2_core.config import DistillConfig
    from sd2_core.distill import distill_rows, vllm_settings
    from sd2_core.generation import make_generator, resolve_backend
    from sd2_core.placement import placement_of
    from sd2_core.vllm_server import shared_server

    assert resolve_backend("auto", "cpu") == "vllm"
    rows = [
        {"id": f"r{i}", "kind": "general", "instruction": f"Say something about the number {i}.", "reference": "ok"}
        for i in range(6)
    ]
    cfg = DistillConfig(max_new_tokens=12, temperature=0.9, seed=3)
    with shared_server(folders["target"], **vllm_settings(cfg, placement_of(cfg))) as server:
        generator = make_generator("vllm", tokenizer=smollm2_tokenizer, server=server)
        _, stats = distill_rows(generator, rows, cfg)
        prompts = [[{"role": "user", "content": row["instruction"]}] for row in rows]
        first, again, other = (generator.generate(prompts, 12, 0.9, 1.0, seed) for seed in (3, 3, 4))
    assert first == again  # a completion depends on its seed and the model only
    assert [o.text for o in first] != [o.text for o in other]
    assert all(o.n_tokens <= 12 for o in first) and any(not o.finished for o in first)
    assert stats["rows"] == 6 and stats["kept"] + stats["fallback"] == 6
    # a random tiny model rarely says EOS within 12 tokens: those answers are cut off and fall back
    assert stats["truncated"] >= 1 and stats["generated_tokens"] <= 6 * 12


def test_served_draft_is_lossless_and_counts_acceptance(vllm_installed, folders, smollm2_tokenizer, tmp_path):
    from sd2_core.artifacts import produce
    from sd2_core.config import MalConfig
    from sd2_core.models import model_recipe
    from sd2_core.serve_bench import serve_bench_recipe, served_target_recipe
    from sd2_core.store import Store

    store = Store(str(tmp_path / "store"))
    target = produce(store, model_recipe(store, str(folders["target"])))
    draft = produce(store, model_recipe(store, str(folders["draft"])))
    cfg = MalConfig(k=3, max_new_tokens=12, per_category=1)
    alone = produce(store, served_target_recipe(store, target, cfg))
    served = produce(store, serve_bench_recipe(store, target, draft, alone, cfg, sd2_mal=1.0))
    figures = served.summary
    print(json.dumps({k: figures[k] for k in ("speedup", "vllm_mal", "identical", "total")}))
    assert figures["total"] > 6 and figures["identical"] == figures["total"]  # greedy speculative = greedy
    assert figures["vllm_drafts"] > 0 and 1.0 <= figures["vllm_mal"] <= cfg.k + 1
    assert figures["tokens_per_second_alone"] > 0 and figures["tokens_per_second_with_draft"] > 0
    assert figures["engine"].startswith("vllm")
    # the target itself as its draft accepts every proposal but the ones cut by EOS / the token limit
    self_served = produce(store, serve_bench_recipe(store, target, target, alone, cfg))
    assert self_served.summary["vllm_mal"] > figures["vllm_mal"]


def test_an_exported_drafter_drafts_in_vllm(vllm_installed, folders, tmp_path):
    from sd2_core.export import SPARSITY_FILE, export_drafter
    from sd2_core.models import load_model, load_tokenizer
    from sd2_core.pruning import magnitude_prune
    from sd2_core.pruning.structure import decoder_linears
    from sd2_core.vllm_server import vllm_server

    model = load_model(folders["draft"])
    for linear in decoder_linears(model).values():
        linear.weight.data, _ = magnitude_prune(linear.weight.data, "2:4")
    save_model(model, load_tokenizer(folders["draft"]), tmp_path / "pruned")
    out = export_drafter(tmp_path / "pruned", tmp_path / "exported")
    assert out["structure"] == "2:4" and abs(out["sparsity"] - 0.5) < 1e-6
    assert json.loads((tmp_path / "exported" / SPARSITY_FILE).read_text())["structure"] == "2:4"
    with pytest.raises(UserError, match="not an empty folder"):
        export_drafter(tmp_path / "pruned", tmp_path / "exported")
    speculative = {"model": str(tmp_path / "exported"), "method": "draft_model", "num_speculative_tokens": 2}
    with vllm_server(folders["target"], dtype="float32", speculative=speculative) as server:
        choice = server.complete(
            [{"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}]
        )
        drafts = server.metrics().get("vllm:spec_decode_num_drafts_total", 0.0)
    assert len(choice[0]["token_ids"]) == 8 and drafts > 0


def test_smoke_cell_distils_on_vllm_and_serves_both_drafts(vllm_installed, prefect_api, tmp_path):
    from flows.cell import cell_flow
    from sd2_core.config import profile

    config = profile("smoke", store=str(tmp_path / "store"))
    first = cell_flow(config=config, return_state=True)
    assert first.is_completed(), first.message
    summary = first.result()
    for stage in ("one_shot", "sd2"):
        served = summary["served"][stage]
        assert served["total"] >= 6 and served["identical"] == served["total"], served
        assert served["engine"].startswith("vllm") and served["speedup"] > 0
        assert served["sd2_mal"] == summary["mal"][stage]["overall"]
    engines = {block["engine"] for block in summary["distill"].values()}
    assert len(engines) == 1 and next(iter(engines)).startswith("vllm"), engines
    again = cell_flow(config=config, return_state=True)  # every stage, served ones included, is a cache hit
    assert again.is_completed() and again.result() == summary


def test_vllm_and_transformers_greedy_on_smollm2(vllm_installed, smollm2_tokenizer):
    """The embedded default, from one safetensors folder, float32 on both engines: the count of identical
    greedy continuations is printed; near-ties may split the two engines' kernels, a template or EOS mismatch
    would split all of them."""
    from transformers import GenerationConfig

    from sd2_core.chat import eos_ids
    from sd2_core.models import builtin_dir
    from sd2_core.vllm_server import vllm_server

    folder = builtin_dir("smollm2-135m-instruct")
    contexts = _contexts(smollm2_tokenizer, 12)
    eos = eos_ids(smollm2_tokenizer, GenerationConfig.from_pretrained(folder))
    expected = _greedy_transformers(folder, contexts, 32, set(eos))
    with vllm_server(folder, dtype="float32") as server:
        bodies = [
            {"prompt": ids, "max_tokens": 32, "temperature": 0.0, "stop_token_ids": eos, "return_token_ids": True}
            for ids in contexts
        ]
        served = [c["token_ids"] for c in server.complete(bodies, parallel=4)]
    identical = sum(a == b for a, b in zip(served, expected, strict=True))
    print(json.dumps({"smollm2_identical": identical, "of": len(contexts)}))
    assert identical >= 2 * len(contexts) // 3, list(zip(served, expected, strict=True))
