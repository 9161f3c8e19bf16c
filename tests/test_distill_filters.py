"""Answers the draft must not learn as the target's: cut off at max_new_tokens, or a wrong math result; and
where the distill stage runs (its placement, resolved when the recipe is made)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import torch
from test_distill import ScriptedGenerator

from sd2_core.artifacts import produce
from sd2_core.chat import chat_input_ids
from sd2_core.config import DistillConfig, SourceSpec
from sd2_core.data.answers import final_number, same_final_number
from sd2_core.data.sources import load_source
from sd2_core.distill import build_distill_messages, distill_recipe, distill_rows, rejection
from sd2_core.errors import UserError
from sd2_core.generation import TransformersGenerator
from sd2_core.models import model_recipe
from sd2_core.store import Store

# ---------------------------------------------------------------- the final number of a math answer


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### 1,234\nThat took 5 steps.", "1234"),  # the marked number, not the last one
        ("The answer is 1,234.", "1234"),
        ("The answer is 72. I hope these 2 steps help.", "72"),
        ("The answer is: $-3.50.", "-3.50"),
        ("She earned $18.50 in total.", "18.50"),
        ("It costs $ 1,000,000.", "1000000"),
        ("So she is down -5.", "-5"),
        ("The change is -$12", "-12"),
        ("The temperature fell to \u22127.", "-7"),  # a Unicode minus
        ("4 * 5 = 20, so the answer is 20.00", "20"),
        ("x = 3.0\n#### 3", "3"),
        ("Between 3-4 hours, so 4.", "4"),
        ("What is 9 - 5", "5"),  # a minus before a space subtracts
        ("5-3", "3"),  # a minus glued to a number subtracts
        ("Use x2 for 12 apples", "12"),
        ("12 apples and 7 pears make 19", "19"),
        ("Half is 0.5.", "0.5"),
        ("The answer is unclear, maybe 7", "7"),  # no number right after "answer is": the last one
        ("no number at all", None),
        ("", None),
    ],
)
def test_final_number(text: str, number: str | None) -> None:
    assert final_number(text) == (None if number is None else Decimal(number))


def test_same_final_number() -> None:
    assert same_final_number("So in all, 72 clips.", "... #### 72")
    assert same_final_number("That is $10.00.", "#### 10")
    assert same_final_number("The answer is 1,200.", "400 * 3 = <<400*3=1200>>1200\n#### 1200")
    assert not same_final_number("So in all, 70 clips.", "#### 72")
    assert not same_final_number("The loss is 5.", "#### -5")
    assert not same_final_number("I do not know.", "#### 72")  # no number: not the right answer
    assert not same_final_number("72", "no number in the reference")


# ---------------------------------------------------------------- which answers are kept


def test_rejection_reasons_in_order() -> None:
    math = {"kind": "math", "instruction": "What is 2+3?", "reference": "2+3=5\n#### 5"}
    assert rejection(math, "It is 5.", finished=True) is None
    assert rejection(math, "", finished=False) == "empty"
    assert rejection(math, "It is 5, because", finished=False) == "truncated"  # right number, but cut off
    assert rejection(math, "The reference answer says 5.", finished=True) == "leaks"
    assert rejection(math, "It is 6.", finished=True) == "math_mismatch"
    general = {**math, "kind": "general"}
    assert rejection(general, "It is 6.", finished=True) is None  # only math rows are checked for the number


def test_cut_off_and_wrong_math_answers_are_never_kept_as_the_targets() -> None:
    rows = [
        {"id": "g0", "kind": "general", "instruction": "Say hi.", "reference": "Hi."},
        {"id": "g1", "kind": "general", "instruction": "Say bye.", "reference": "Bye."},
        {"id": "m0", "kind": "math", "instruction": "What is 2+3?", "reference": "2+3=5\n#### 5"},
        {"id": "m1", "kind": "math", "instruction": "What is 4*4?", "reference": "4*4=16\n#### 16"},
        {"id": "m2", "kind": "math", "instruction": "What is 9-1?", "reference": "9-1=8\n#### 8"},
        {"id": "m3", "kind": "math", "instruction": "What is 600*2?", "reference": "600*2=1200\n#### 1200"},
    ]
    script = {
        "Say hi.": "Hello there!",
        "Say bye.": ("Goodbye, and thank you for all the", False),  # hit max_new_tokens
        "What is 2+3?": "Two plus three is 5.",
        "What is 4*4?": "Four times four is 18.",  # wrong
        "What is 9-1?": ("Nine minus one is 8, because", False),  # right number, but cut off
        "What is 600*2?": "600 times 2 is $1,200.",
    }
    out, stats = distill_rows(ScriptedGenerator(script), rows, DistillConfig(batch_size=4))
    answers = {r["id"]: (r["distilled"], r["messages"][1]["content"]) for r in out}
    assert answers == {
        "g0": (True, "Hello there!"),
        "g1": (False, "Bye."),
        "m0": (True, "Two plus three is 5."),
        "m1": (False, "4*4=16\n#### 16"),
        "m2": (False, "9-1=8\n#### 8"),
        "m3": (True, "600 times 2 is $1,200."),
    }
    counts = {k: stats[k] for k in ("kept", "fallback", "empty", "truncated", "leaks", "math_mismatch")}
    assert counts == {"kept": 3, "fallback": 3, "empty": 0, "truncated": 2, "leaks": 0, "math_mismatch": 1}


def test_the_real_generator_says_which_answers_were_cut_off(tiny_llama, smollm2_tokenizer) -> None:
    """A tiny random Llama does not say EOS within 4 tokens: every answer is cut off, and none is kept."""
    model = tiny_llama(pad_token_id=smollm2_tokenizer.pad_token_id)
    generator = TransformersGenerator(model, smollm2_tokenizer, batch_size=2)
    prompts = [[{"role": "user", "content": q}] for q in ("Say hi.", "Count to three.", "Name a colour.")]
    cut = generator.generate(prompts, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    assert [(o.finished, o.n_tokens) for o in cut] == [(False, 4)] * 3
    rows = [
        {"id": str(i), "kind": "general", "instruction": p[0]["content"], "reference": "ref"}
        for i, p in enumerate(prompts)
    ]
    out, stats = distill_rows(generator, rows, DistillConfig(max_new_tokens=4, temperature=0.0, batch_size=2))
    assert stats["truncated"] == 3 and stats["kept"] == 0
    assert all(not r["distilled"] and r["messages"][1]["content"] == "ref" for r in out)


# ---------------------------------------------------------------- the distill stage on a real tiny target

MAX_NEW = 8
REQUESTS = (
    "Name a colour.",
    "Say hi.",
    "Count to three.",
    "What is the capital of France?",
    "Write a haiku.",
    "List two fruits.",
    "Why is the sky blue?",
    "Tell me a joke.",
)


def _greedy(model, tokenizer, messages) -> list[int]:
    """Up to MAX_NEW greedy tokens by plain `model.generate` (the tokenizer's EOS, if it comes, included)."""
    ids = torch.tensor([chat_input_ids(tokenizer, messages)])
    out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _end(tokens: list[int], stops: set[int]) -> int | None:
    """Where the answer ends (the first stop token), or None when it runs into max_new_tokens."""
    return next((i for i, t in enumerate(tokens) if t in stops), None)


def _stop_splitting(continuations: list[list[int]], eos: int) -> int:
    """A token that, as an extra EOS, ends some of the continuations after their first token and leaves the
    others to run into max_new_tokens."""
    for candidate in dict.fromkeys(t for c in continuations for t in c[1:]):
        ends = [_end(c, {eos, candidate}) for c in continuations]
        if None in ends and 0 not in ends and any(e is not None for e in ends):
            return candidate
    raise AssertionError(f"no token splits these greedy continuations: {continuations}")


@pytest.fixture(scope="module")
def staged(tiny_llama, smollm2_tokenizer, tmp_path_factory):
    """A store with a tiny target (saved as a model folder) whose extra EOS token ends some of the greedy
    answers to REQUESTS within MAX_NEW tokens and not others, a local source of those requests, and what
    plain `generate` says each answer is: (store, target, source, {instruction: (finished, text)})."""
    root = tmp_path_factory.mktemp("distill-stage")
    source_file = root / "requests.jsonl"
    source_file.write_text(
        "".join(json.dumps({"instruction": q, "output": f"Reference for: {q}"}) + "\n" for q in REQUESTS)
    )
    source = SourceSpec(kind="general", uri=str(source_file), limit=len(REQUESTS))
    tokenizer = smollm2_tokenizer
    model = tiny_llama(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rows = load_source(source)
    continuations = [_greedy(model, tokenizer, build_distill_messages(row)) for row in rows]
    stop = _stop_splitting(continuations, tokenizer.eos_token_id)
    expected = {}
    for row, tokens in zip(rows, continuations, strict=True):
        end = _end(tokens, {tokenizer.eos_token_id, stop})
        expected[row["instruction"]] = (end is not None, tokenizer.decode(tokens[:end], skip_special_tokens=True))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    folder = root / "target"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    store = Store(str(root / "store"))
    return store, produce(store, model_recipe(store, str(folder))), source, expected


def test_the_stage_keeps_answers_that_ended_and_falls_back_on_cut_off_ones(staged) -> None:
    store, target, source, expected = staged
    cfg = DistillConfig(max_new_tokens=MAX_NEW, temperature=0.0, batch_size=1, device="cpu", dtype="float32")
    ref = produce(store, distill_recipe(store, target, source, cfg))
    rows = [json.loads(line) for line in (store.local_dir(ref) / "data.jsonl").read_text().splitlines()]
    summary = store.manifest("distill", ref.key)["summary"]

    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(REQUESTS)
    n_cut = sum(not finished for finished, _ in expected.values())
    assert 0 < n_cut < len(REQUESTS)  # the fixture made both kinds
    for row in rows:
        request, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        finished, text = expected[request]
        if finished:
            assert row["distilled"] and answer == text.strip() and answer, request
        else:  # the cut-off answer is nowhere in the training row
            assert not row["distilled"] and answer == f"Reference for: {request}", request
    counts = {k: summary[k] for k in ("rows", "kept", "fallback", "truncated", "leaks", "math_mismatch", "empty")}
    assert counts == {
        "rows": len(REQUESTS),
        "kept": len(REQUESTS) - n_cut,
        "fallback": n_cut,
        "truncated": n_cut,
        "leaks": 0,
        "math_mismatch": 0,
        "empty": 0,
    }
    assert (summary["distilled"], summary["fallbacks"]) == (summary["kept"], summary["fallback"])
    assert summary["kind"] == "general"


def test_the_recipe_keys_the_resolved_placement(staged) -> None:
    store, target, source, _ = staged
    recipe = distill_recipe(store, target, source, DistillConfig(device="cpu", dtype="bfloat16"))
    assert recipe.config["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert "device" not in recipe.config["distill"] and "dtype" not in recipe.config["distill"]
    fp32 = distill_recipe(store, target, source, DistillConfig(device="cpu", dtype="float32"))
    assert fp32.key != recipe.key
    if not torch.cuda.is_available():  # auto is the CPU in float32 here: the same result, the same key
        assert distill_recipe(store, target, source, DistillConfig(device="auto", dtype="auto")).key == fp32.key


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_recipe_refuses_cuda_here_before_loading(staged) -> None:
    store, target, source, _ = staged
    with pytest.raises(UserError, match="device 'cuda' needs CUDA, and this machine has no CUDA device"):
        distill_recipe(store, target, source, DistillConfig(device="cuda"))
