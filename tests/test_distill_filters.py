"""Answers the draft must not learn as the target's: cut off at max_new_tokens, or a wrong math result."""

from __future__ import annotations

from decimal import Decimal

import pytest
from test_distill import ScriptedGenerator

from sd2_core.config import DistillConfig
from sd2_core.data.answers import final_number, same_final_number
from sd2_core.distill import distill_rows
from sd2_core.generation import TransformersGenerator


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The answer is 1,234.", "1234"),
        ("She earned $18.50 in total.", "18.50"),
        ("So she is down -5.", "-5"),
        ("The change is -$12", "-12"),
        ("4 * 5 = 20, so the answer is 20.00", "20"),
        ("x = 3.0\n#### 3", "3"),
        ("Between 3-4 hours, so 4.", "4"),
        ("12 apples and 7 pears make 19", "19"),
        ("no number at all", None),
    ],
)
def test_final_number(text: str, number: str | None) -> None:
    assert final_number(text) == (None if number is None else Decimal(number))


def test_same_final_number() -> None:
    assert same_final_number("So in all, 72 clips.", "... #### 72")
    assert same_final_number("That is $10.00.", "#### 10")
    assert not same_final_number("So in all, 70 clips.", "#### 72")
    assert not same_final_number("I do not know.", "#### 72")  # no number: not the right answer


def test_cut_off_and_wrong_math_answers_are_never_kept_as_the_targets() -> None:
    rows = [
        {"id": "g0", "kind": "general", "instruction": "Say hi.", "reference": "Hi."},
        {"id": "g1", "kind": "general", "instruction": "Say bye.", "reference": "Bye."},
        {"id": "m0", "kind": "math", "instruction": "What is 2+3?", "reference": "2+3=5\n#### 5"},
        {"id": "m1", "kind": "math", "instruction": "What is 4*4?", "reference": "4*4=16\n#### 16"},
        {"id": "m2", "kind": "math", "instruction": "What is 9-1?", "reference": "9-1=8\n#### 8"},
    ]
    script = {
        "Say hi.": "Hello there!",
        "Say bye.": ("Goodbye, and thank you for all the", False),  # hit max_new_tokens
        "What is 2+3?": "Two plus three is 5.",
        "What is 4*4?": "Four times four is 18.",  # wrong
        "What is 9-1?": ("Nine minus one is 8, because", False),  # right number, but cut off
    }
    out, stats = distill_rows(ScriptedGenerator(script), rows, DistillConfig(batch_size=5))
    answers = {r["id"]: (r["distilled"], r["messages"][1]["content"]) for r in out}
    assert answers == {
        "g0": (True, "Hello there!"),
        "g1": (False, "Bye."),
        "m0": (True, "Two plus three is 5."),
        "m1": (False, "4*4=16\n#### 16"),
        "m2": (False, "9-1=8\n#### 8"),
    }
    assert (stats["distilled"], stats["fallbacks"], stats["truncated"], stats["math_mismatch"]) == (2, 3, 2, 1)


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
    assert stats["truncated"] == 3 and stats["distilled"] == 0
    assert all(not r["distilled"] and r["messages"][1]["content"] == "ref" for r in out)
