"""Bootstrap intervals over prompts: pooled MAL, the paired SD² − one-shot difference, accuracy differences."""

from __future__ import annotations

import pytest

from sd2_core.confidence import accuracy_difference, mal_interval, paired_mal_difference, prompt_counts
from sd2_core.errors import UserError


def test_turns_of_one_prompt_are_one_unit():
    rows = [
        {"id": "a", "turn": 1, "tokens": 10, "steps": 5},
        {"id": "a", "turn": 2, "tokens": 6, "steps": 3},
        {"id": "b", "turn": 1, "tokens": 4, "steps": 4},
    ]
    assert prompt_counts(rows) == {"a": (16, 8), "b": (4, 4)}


def test_interval_holds_the_pooled_mal_and_is_seeded():
    counts = {str(i): (10 + i % 7, 5 + i % 3) for i in range(40)}
    ci = mal_interval(counts, iterations=500)
    pooled = sum(t for t, _ in counts.values()) / sum(s for _, s in counts.values())
    assert ci["mal"] == pytest.approx(pooled)
    assert ci["lo"] < pooled < ci["hi"]
    assert ci == mal_interval(counts, iterations=500)
    assert mal_interval({"x": (8, 4)})["lo"] == mal_interval({"x": (8, 4)})["hi"] == 2.0


def test_paired_difference_sees_a_consistent_gain_that_unpaired_noise_hides():
    # prompts differ a lot from each other, but the second draft gains ~0.25 MAL on every one of them
    before = {str(i): (20 + 15 * (i % 5), 10) for i in range(30)}
    after = {k: (t + 2 + (int(k) % 2), s) for k, (t, s) in before.items()}
    diff = paired_mal_difference(after, before, iterations=1000)
    assert diff["difference"] == pytest.approx(0.25)
    assert diff["significant"] and diff["lo"] > 0
    a, b = mal_interval(after, iterations=1000), mal_interval(before, iterations=1000)
    assert a["lo"] < b["hi"]  # the separate intervals overlap: only the paired test can tell


def test_no_difference_is_not_significant_and_mismatched_prompts_are_refused():
    same = {str(i): (10 + i, 5) for i in range(20)}
    flipped = {k: (t + (1 if int(k) % 2 else -1), s) for k, (t, s) in same.items()}
    assert not paired_mal_difference(flipped, same, iterations=500)["significant"]
    with pytest.raises(UserError, match="same prompts"):
        paired_mal_difference({"a": (1, 1)}, {"b": (1, 1)})
    with pytest.raises(UserError, match="iterations"):
        mal_interval(same, iterations=0)


def test_accuracy_difference_from_standard_errors():
    d = accuracy_difference({"value": 0.6, "stderr": 0.02}, {"value": 0.5, "stderr": 0.02})
    assert d["difference"] == pytest.approx(0.1) and d["significant"]
    assert d["lo"] == pytest.approx(0.1 - 1.959963984540054 * (0.0008**0.5))
    assert not accuracy_difference({"value": 0.55, "stderr": 0.1}, {"value": 0.5, "stderr": 0.1})["significant"]
    assert accuracy_difference({"value": 0.5, "stderr": None}, {"value": 0.4, "stderr": 0.1})["significant"] is None
