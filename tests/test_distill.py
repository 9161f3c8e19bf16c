"""Generation backends and self-data distillation, with a tiny random Llama and the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch

from sd2_core.config import DistillConfig, SourceSpec
from sd2_core.data.sources import load_source
from sd2_core.distill import LEAK_MARKERS, build_distill_messages, distill_rows, leaks_prompt
from sd2_core.errors import UserError
from sd2_core.generation import GenerationOutput, TransformersGenerator, make_generator, resolve_backend

HELLO = [{"role": "user", "content": "Hello there"}]
POEM = [{"role": "user", "content": "Write a long poem about the sea, with rhymes, in five stanzas please."}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama, smollm2_tokenizer):
    """The shared tiny Llama with the tokenizer's special ids, so ``generate`` stops at the real EOS."""
    return tiny_llama(
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def generator(tiny_model, smollm2_tokenizer):
    return TransformersGenerator(tiny_model, smollm2_tokenizer, batch_size=2)


def _greedy_ids(model, tokenizer, messages, n):
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1] :].tolist()


# ---------------------------------------------------------------- generation


def test_sampling_is_seeded(generator):
    prompts = [HELLO, POEM, HELLO]
    a = generator.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=5)
    b = generator.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=5)
    c = generator.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=6)
    assert len(a) == 3 and all(isinstance(o, GenerationOutput) for o in a)
    assert a == b
    assert a != c
    assert all(1 <= o.n_tokens <= 8 for o in a)
    assert a[0] != a[2]  # the same prompt in another batch gets another seed


def test_greedy_matches_plain_generate_and_left_padding_is_harmless(generator, tiny_model, smollm2_tokenizer):
    expected = smollm2_tokenizer.decode(_greedy_ids(tiny_model, smollm2_tokenizer, HELLO, 6), skip_special_tokens=True)
    alone = TransformersGenerator(tiny_model, smollm2_tokenizer, batch_size=1).generate(
        [HELLO], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0
    )
    batched = generator.generate([POEM, HELLO], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=123)
    assert alone[0].text == expected.strip() and alone[0].text
    assert batched[1] == alone[0]  # HELLO is left-padded next to the longer POEM: same tokens


def test_generation_stops_at_eos(tiny_model, smollm2_tokenizer):
    ids = _greedy_ids(tiny_model, smollm2_tokenizer, HELLO, 6)
    stop = ids[2]
    assert stop not in ids[:2]
    saved = tiny_model.generation_config.eos_token_id
    tiny_model.generation_config.eos_token_id = [smollm2_tokenizer.eos_token_id, stop]
    try:
        gen = TransformersGenerator(tiny_model, smollm2_tokenizer, batch_size=1)
        (out,) = gen.generate([HELLO], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    finally:
        tiny_model.generation_config.eos_token_id = saved
    assert out.n_tokens == 2 and out.finished  # ended by a stop token, not by max_new_tokens
    assert out.text == smollm2_tokenizer.decode(ids[:2], skip_special_tokens=True).strip()


def test_bad_sampling_arguments_and_backends(generator, tiny_model, smollm2_tokenizer):
    with pytest.raises(UserError, match="top_p"):
        generator.generate([HELLO], max_new_tokens=4, temperature=1.0, top_p=0.0, seed=0)
    with pytest.raises(UserError, match="unknown generation backend"):
        make_generator("tgi", model=tiny_model, tokenizer=smollm2_tokenizer)
    with pytest.raises(UserError, match="tokenizer"):
        make_generator("transformers")
    with pytest.raises(UserError, match="model and tokenizer"):
        make_generator("transformers", tokenizer=smollm2_tokenizer)
    with pytest.raises(UserError, match="running vLLM server"):
        make_generator("vllm", tokenizer=smollm2_tokenizer)
    made = make_generator("transformers", tiny_model, smollm2_tokenizer, batch_size=3)
    assert isinstance(made, TransformersGenerator) and made.batch_size == 3
    with pytest.raises(UserError, match=r"unknown generation backend 'tgi'; valid backends: auto, transformers, vllm"):
        resolve_backend("tgi")


def test_without_vllm_auto_is_transformers_and_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setenv("SD2_VLLM", "off")  # as on a machine without vLLM (conftest's default for these tests)
    assert resolve_backend("auto", "cpu") == "transformers"
    assert resolve_backend("transformers", "cuda") == "transformers"
    with pytest.raises(UserError, match=r"not installed: bash scripts/setup_vllm\.sh"):
        resolve_backend("vllm", "cpu")
    monkeypatch.setenv("SD2_VLLM", "/nonexistent/vllm")
    with pytest.raises(UserError, match="SD2_VLLM='/nonexistent/vllm' is not an executable"):
        resolve_backend("auto", "cpu")


# ---------------------------------------------------------------- the distillation prompt and leak check


def test_distill_prompt_shows_instruction_and_reference():
    row = {"id": "g-1", "kind": "general", "instruction": "Name three primes.", "reference": "2, 3 and 5."}
    messages = build_distill_messages(row)
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert content.endswith("\n\nName three primes.")  # the request comes last, after the reference
    assert "2, 3 and 5." in content
    assert "in your own words" in content
    with pytest.raises(UserError, match="instruction"):
        build_distill_messages({"id": "x", "reference": "r"})


def test_leaks_prompt():
    assert leaks_prompt("As the Reference Answer says, Paris.")
    assert leaks_prompt("Here is my response: Paris.")
    assert leaks_prompt("Your turn! Paris.")
    assert not leaks_prompt("The capital of France is Paris.")
    assert not leaks_prompt("He preferred to write every day.")
    # a marker the instruction itself uses is not a leak
    assert leaks_prompt("Here is a rewrite: The cat sat.")
    assert not leaks_prompt("Here is a rewrite: The cat sat.", instruction="Rewrite this sentence: cat sat.")
    assert all(leaks_prompt(f"Sure. {marker.upper()}: done.") for marker in LEAK_MARKERS)  # in any case


# ---------------------------------------------------------------- distill_rows


class ScriptedGenerator:
    """A real (if trivial) Generator: answers from a script keyed by the request line, records its calls.

    A script value is the answer's text, or (text, finished) for an answer cut off at max_new_tokens.
    """

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.calls: list[tuple[int, int]] = []

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        self.calls.append((len(prompts), seed))
        outputs = []
        for messages in prompts:
            content = messages[-1]["content"]
            request = next(key for key in self.script if content.endswith(f"\n\n{key}"))
            answer = self.script[request]
            text, finished = answer if isinstance(answer, tuple) else (answer, True)
            outputs.append(GenerationOutput(text=text, n_tokens=len(text.split()), finished=finished))
        return outputs


def test_distill_rows_falls_back_to_the_reference_on_leaks_and_empty_answers():
    rows = [
        {"id": f"r{i}", "kind": "general", "instruction": f"Question {i}?", "reference": f"Reference {i}."}
        for i in range(5)
    ]
    script = {
        "Question 0?": "Answer zero in my words.",
        "Question 1?": "Based on the reference answer, one.",
        "Question 2?": "   ",
        "Question 3?": "Three, plainly.",
        "Question 4?": "Now it's your turn: four.",
    }
    generator = ScriptedGenerator(script)
    seen: list[tuple[int, int, str]] = []
    cfg = DistillConfig(batch_size=2, seed=10)
    out, stats = distill_rows(generator, rows, cfg, progress=lambda d, t, m: seen.append((d, t, m)))

    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [r["distilled"] for r in out] == [True, False, False, True, False]
    answers = [r["messages"][1]["content"] for r in out]
    assert answers == ["Answer zero in my words.", "Reference 1.", "Reference 2.", "Three, plainly.", "Reference 4."]
    for row, source in zip(out, rows, strict=True):
        assert row["kind"] == "general"
        assert row["messages"][0] == {"role": "user", "content": source["instruction"]}
        assert row["messages"][1]["role"] == "assistant"
    assert (stats["rows"], stats["kept"], stats["fallback"]) == (5, 2, 3)
    assert (stats["distilled"], stats["fallbacks"]) == (2, 3)  # the names the cell record and listing read
    assert stats["leaks"] == 2 and stats["empty"] == 1 and stats["truncated"] == stats["math_mismatch"] == 0
    assert stats["generated_tokens"] == sum(len(t.split()) for t in script.values())
    assert stats["seconds"] >= 0 and stats["tokens_per_second"] >= 0
    assert generator.calls == [(2, 10), (2, 12), (1, 14)]
    assert [d for d, _, _ in seen] == [0, 2, 4, 5] and all(t == 5 for _, t, _ in seen)


def test_distill_rows_with_a_real_model_is_reproducible(generator):
    rows = load_source(SourceSpec(kind="math", limit=3, seed=0))
    cfg = DistillConfig(max_new_tokens=6, temperature=0.9, batch_size=2, seed=1)
    out, stats = distill_rows(generator, rows, cfg)
    again, _ = distill_rows(generator, rows, cfg)
    assert out == again
    assert len(out) == 3 and stats["rows"] == 3
    assert 0 < stats["generated_tokens"] <= 3 * 6
    assert stats["kept"] + stats["fallback"] == 3
    assert stats["fallback"] == stats["empty"] + stats["truncated"] + stats["leaks"] + stats["math_mismatch"]
    for row, source in zip(out, rows, strict=True):
        assert row["messages"][0]["content"] == source["instruction"]  # the reference never reaches the training row
        if not row["distilled"]:
            assert row["messages"][1]["content"] == source["reference"]
