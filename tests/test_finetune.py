"""Sparse fine-tuning: zeros stay zero, the loss falls, only responses carry loss, mixing, the paper's LR table
(SD² Appendix A) and the finetune stage's choice of rate and steps.

The tokenizer is the real SmolLM2 one (session fixture ``smollm2_tokenizer`` from conftest.py);
where that fixture is absent, a small real WordLevel tokenizer trained in memory with its own chat
template stands in. The label tests run on both.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from sd2_core.artifacts import Recipe, produce
from sd2_core.chat import IGNORE_INDEX, tokenize_chat_example
from sd2_core.config import FinetuneConfig, profile, variant_prune
from sd2_core.data.mixing import mix_examples
from sd2_core.errors import UserError
from sd2_core.finetune import finetune_recipe, finetune_sparse, learning_rate, warmup_linear_decay
from sd2_core.learning_rates import (
    COLUMNS,
    KINDS,
    LLAMA_ROWS,
    QWEN_ROWS,
    default_learning_rate,
    learning_rate_choice,
)
from sd2_core.store import Store

CORPUS = [
    "user assistant : what is two plus two ? it is four .",
    "translate hello into german . hallo .",
    "name a colour of the sky . the sky is blue .",
    "tell me a fact about cats . cats sleep a lot of the day .",
    "hi there hello friend how can i help you today",
]
WORD_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
PAIRS = [
    ("what is two plus two ?", "it is four ."),
    ("translate hello into german .", "hallo ."),
    ("name a colour of the sky .", "the sky is blue ."),
    ("tell me a fact about cats .", "cats sleep a lot of the day ."),
]
EXAMPLES = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]


def word_tokenizer(template: str = WORD_TEMPLATE) -> PreTrainedTokenizerFast:
    """A real (if small) fast tokenizer: WordLevel vocabulary trained in memory, plus a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = template
    return fast


@pytest.fixture(params=["smollm2", "wordlevel"])
def any_tokenizer(request):
    if request.param == "wordlevel":
        return word_tokenizer()
    return _smollm2_or_word(request)


@pytest.fixture
def chat_tokenizer(request):
    return _smollm2_or_word(request)


def _smollm2_or_word(request):
    try:
        return request.getfixturevalue("smollm2_tokenizer")
    except pytest.FixtureLookupError:
        return word_tokenizer()


@pytest.fixture
def new_model(tiny_llama, chat_tokenizer):
    """``new_model()``: a fresh tiny Llama for ``chat_tokenizer`` (its vocabulary and pad id), with tied
    embeddings as SmolLM2 has, so fine-tuning meets a shared embedding/lm_head weight."""
    return lambda: tiny_llama(
        vocab_size=len(chat_tokenizer), pad_token_id=chat_tokenizer.pad_token_id, tie_word_embeddings=True
    )


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


def magnitude_prune_half(model) -> dict[str, torch.Tensor]:
    """Zero the smaller half (by magnitude) of every decoder Linear weight; return the keep-masks."""
    keeps = {}
    with torch.no_grad():
        for name, module in decoder_linears(model).items():
            flat = module.weight.abs().flatten()
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(flat.numel() - flat.numel() // 2).indices] = True
            keep = keep.view_as(module.weight)
            module.weight.masked_fill_(~keep, 0.0)
            keeps[name] = keep
    return keeps


# ---------------------------------------------------------------- labels


def test_only_the_assistant_response_carries_loss(any_tokenizer):
    tok = any_tokenizer
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"}]
    ids, labels = tokenize_chat_example(tok, messages, max_seq_len=512)
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled, "no token carries loss"
    # the labelled tokens are one contiguous tail and equal the input ids there
    assert labelled == list(range(labelled[0], len(ids)))
    assert [labels[i] for i in labelled] == ids[labelled[0] :]
    response = tok.decode(ids[labelled[0] :], skip_special_tokens=False)
    prompt = tok.decode(ids[: labelled[0]], skip_special_tokens=False)
    full_text = tok.apply_chat_template(messages, tokenize=False)
    prefix_text = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert " ".join(response.split()) == " ".join(full_text[len(prefix_text) :].split())
    assert response.strip().startswith("hello friend")
    assert "hi there" in prompt and "hello friend" not in prompt
    if "<|im_end|>" in tok.get_vocab():  # the real SmolLM2 template: response plus its end-of-turn marker
        assert response == "hello friend<|im_end|>\n"


def test_cut_keeps_partial_response_and_empties_a_fully_cut_one(chat_tokenizer):
    tok = chat_tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello friend " * 20}]
    full_ids, full_labels = tokenize_chat_example(tok, messages, max_seq_len=4096)
    start = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    ids, labels = tokenize_chat_example(tok, messages, max_seq_len=start + 3)
    assert ids == full_ids[: start + 3]
    assert sum(label != IGNORE_INDEX for label in labels) == 3
    ids, labels = tokenize_chat_example(tok, messages, max_seq_len=start)
    assert len(ids) == start and all(label == IGNORE_INDEX for label in labels)


def test_template_whose_prompt_is_not_a_prefix_is_refused():
    odd = (
        "{% for m in messages %}<s> {{ 'bot' if m['role'] == 'assistant' else m['role'] }} : {{ m['content'] }} </s> "
        "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"}]
    with pytest.raises(UserError, match="prefix"):
        tokenize_chat_example(word_tokenizer(odd), messages, max_seq_len=64)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user"}, {"role": "assistant", "content": "a"}],
    ],
)
def test_malformed_chats_are_refused(messages):
    with pytest.raises(UserError):
        tokenize_chat_example(word_tokenizer(), messages, max_seq_len=64)


# ---------------------------------------------------------------- fine-tuning


def test_pruned_weights_stay_exactly_zero_and_kept_weights_move(new_model, chat_tokenizer):
    model = new_model()
    keeps = magnitude_prune_half(model)
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}
    cfg = FinetuneConfig(steps=8, batch_size=2, max_seq_len=128, learning_rate=5e-2, weight_decay=0.1, warmup_ratio=0.0)
    calls = []
    result = finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, progress=lambda *a: calls.append(a))  # masks: zeros
    assert [(done, total) for done, total, _ in calls] == [(i, 8) for i in range(1, 9)]
    for name, module in decoder_linears(model).items():
        weight, keep = module.weight.detach(), keeps[name]
        assert torch.count_nonzero(weight[~keep]) == 0, f"{name}: a pruned weight moved"
        assert int((weight == 0).sum()) == weight.numel() // 2, f"{name}: sparsity changed"
        moved = (weight[keep] != before[name][keep]).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of the kept weights changed"
    assert result["steps"] == 8 and len(result["losses"]) == 8 and result["lr"] == 5e-2
    assert result["tokens"] > 0 and result["skipped"] == 0 and result["tokens_per_second"] > 0
    assert not model.training
    for module in decoder_linears(model).values():
        assert not module.weight._backward_hooks, "gradient hooks were left on the weights"


def test_without_masks_the_same_run_moves_the_zeros(new_model, chat_tokenizer):
    """Control for the test above: with no fixed masks, AdamW at this lr does revive pruned weights."""
    model = new_model()
    keeps = magnitude_prune_half(model)
    cfg = FinetuneConfig(steps=8, batch_size=2, max_seq_len=128, learning_rate=5e-2, weight_decay=0.1, warmup_ratio=0.0)
    finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, masks={})
    revived = sum(int(torch.count_nonzero(m.weight.detach()[~keeps[n]])) for n, m in decoder_linears(model).items())
    assert revived > 0


def test_explicit_masks_by_parameter_name_zero_and_hold_the_weights(new_model, chat_tokenizer):
    model = new_model()
    name = "model.layers.1.mlp.up_proj"
    weight = dict(model.named_modules())[name].weight
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.25
    cfg = FinetuneConfig(steps=3, batch_size=2, max_seq_len=128, learning_rate=1e-2)
    finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, masks={f"{name}.weight": keep})
    assert torch.count_nonzero(weight.detach()[~keep]) == 0
    assert torch.count_nonzero(weight.detach()[keep]) == int(keep.sum())
    other = dict(model.named_modules())["model.layers.1.mlp.down_proj"].weight
    assert torch.count_nonzero(other.detach()) == other.numel()  # unmasked layers stay dense


def test_bad_masks_are_refused(new_model, chat_tokenizer):
    model = new_model()
    cfg = FinetuneConfig(steps=1, batch_size=1, max_seq_len=64, learning_rate=1e-3)
    small = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(UserError, match="names no module"):
        finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, masks={"model.layers.9.nope": small})
    with pytest.raises(UserError, match="shape"):
        finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, masks={"model.layers.0.mlp.up_proj": small})


def test_loss_falls_on_a_small_repeated_dataset(new_model, chat_tokenizer):
    model = new_model()
    magnitude_prune_half(model)
    cfg = FinetuneConfig(steps=12, batch_size=4, max_seq_len=128, learning_rate=5e-3, warmup_ratio=0.1)
    losses = finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg)["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_same_seed_same_run(new_model, chat_tokenizer):
    cfg = FinetuneConfig(steps=4, batch_size=2, max_seq_len=128, learning_rate=1e-3, seed=3)
    runs = [finetune_sparse(new_model(), chat_tokenizer, EXAMPLES, cfg)["losses"] for _ in range(2)]
    assert runs[0] == runs[1]


def _decoder_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}


def test_micro_batches_accumulate_to_the_whole_batch(new_model, chat_tokenizer):
    """Rows of different lengths: token-weighted accumulation over micro-batches of 1 equals one pass of 4."""
    runs = []
    for micro in (None, 1, 2):
        model = new_model()
        magnitude_prune_half(model)
        cfg = FinetuneConfig(steps=3, batch_size=4, micro_batch_size=micro, max_seq_len=128, learning_rate=1e-2)
        runs.append((finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg)["losses"], _decoder_weights(model)))
    (whole_losses, whole), *parts = runs
    for losses, weights in parts:
        assert losses == pytest.approx(whole_losses, rel=1e-5)
        for name, weight in weights.items():
            torch.testing.assert_close(weight, whole[name], rtol=1e-4, atol=1e-5)  # Adam magnifies rounding
            assert torch.equal(weight == 0, whole[name] == 0), f"{name}: another mask"


def test_gradient_checkpointing_gives_the_same_run(new_model, chat_tokenizer):
    runs = []
    for checkpointing in (False, True):
        model = new_model()
        cfg = FinetuneConfig(
            steps=3, batch_size=2, max_seq_len=128, learning_rate=1e-2, gradient_checkpointing=checkpointing
        )
        runs.append((finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg)["losses"], model))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert not runs[1][1].is_activation_checkpointing and runs[1][1].config.use_cache


def test_bfloat16_autocast_on_cpu_keeps_float32_masters_and_zeros(new_model, chat_tokenizer):
    model = new_model()
    keeps = magnitude_prune_half(model)
    cfg = FinetuneConfig(steps=6, batch_size=2, max_seq_len=128, learning_rate=5e-3, device="cpu", dtype="bfloat16")
    result = finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg)
    fp32 = finetune_sparse(new_model(), chat_tokenizer, EXAMPLES, cfg.model_copy(update={"dtype": "float32"}))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, module in decoder_linears(model).items():
        assert torch.count_nonzero(module.weight.detach()[~keeps[name]]) == 0
    # bf16 arithmetic is visible in the losses, yet it trains the same model to about the same loss
    assert result["losses"] != fp32["losses"]
    assert result["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.05)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(ValueError, match="micro_batch_size 3 does not divide batch_size 4"):
        FinetuneConfig(batch_size=4, micro_batch_size=3)


def test_cuda_on_a_machine_without_it_is_refused_before_training(new_model, chat_tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    cfg = FinetuneConfig(steps=1, batch_size=1, max_seq_len=64, learning_rate=1e-3, device="cuda")
    with pytest.raises(UserError, match="needs CUDA, and this machine has no CUDA device"):
        finetune_sparse(new_model(), chat_tokenizer, EXAMPLES, cfg)


def test_learning_rate_defaults_to_the_table(new_model, chat_tokenizer):
    model = new_model()
    cfg = FinetuneConfig(steps=1, batch_size=1, max_seq_len=128)
    result = finetune_sparse(
        model, chat_tokenizer, EXAMPLES, cfg, num_params_for_lr=3_000_000_000, sparsity_for_lr=0.5, kind_for_lr="nm"
    )
    assert result["lr"] == default_learning_rate(3_000_000_000, 0.5, "nm") == 7.5e-6
    assert result["lr_source"] == "SD² Appendix A, row Llama-3.2-3B-Instruct (nearest size ≥ 3B), column 2:4"


def test_rows_with_the_response_cut_away_are_skipped_and_none_usable_is_refused(new_model, chat_tokenizer):
    long_prompt = {"role": "user", "content": " ".join(["what is two plus two ?"] * 20)}
    cut = {"messages": [long_prompt, {"role": "assistant", "content": "four ."}]}
    cfg = FinetuneConfig(steps=2, batch_size=2, max_seq_len=64, learning_rate=1e-3)
    result = finetune_sparse(new_model(), chat_tokenizer, [cut, EXAMPLES[1]], cfg)
    assert result["skipped"] == 1
    with pytest.raises(UserError, match="no usable"):
        finetune_sparse(new_model(), chat_tokenizer, [cut, cut], cfg)
    with pytest.raises(UserError, match="no usable"):
        finetune_sparse(new_model(), chat_tokenizer, [], cfg)
    with pytest.raises(UserError, match="messages"):
        finetune_sparse(new_model(), chat_tokenizer, [{"prompt": "hi"}], cfg)


def test_warmup_then_linear_decay():
    factors = [warmup_linear_decay(10, 2)(s) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] == pytest.approx(1 / 8) and min(factors) > 0
    assert [warmup_linear_decay(4, 0)(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


# ---------------------------------------------------------------- mixing


def _sources() -> dict[str, list[dict]]:
    return {
        "general": [{"id": f"g{i}"} for i in range(50)],
        "translation": [{"id": f"t{i}"} for i in range(3)],
        "math": [{"id": f"m{i}"} for i in range(7)],
    }


def test_mix_follows_the_weights():
    weights = {"general": 0.75, "translation": 0.125, "math": 0.125}
    rows = mix_examples(_sources(), weights, total=20_000, seed=0)
    assert len(rows) == 20_000
    counts = collections.Counter(r["id"][0] for r in rows)
    for key, share in (("g", 0.75), ("t", 0.125), ("m", 0.125)):
        assert counts[key] / 20_000 == pytest.approx(share, abs=0.005)
    # the 3-row source is drawn with replacement, evenly
    per_row = collections.Counter(r["id"] for r in rows if r["id"].startswith("t"))
    assert set(per_row) == {"t0", "t1", "t2"} and max(per_row.values()) - min(per_row.values()) <= 1


def test_mix_is_deterministic_by_seed_and_unweighted_sources_are_unused():
    weights = {"general": 3.0, "math": 1.0}
    a = mix_examples(_sources(), weights, total=40, seed=7)
    assert a == mix_examples(_sources(), weights, total=40, seed=7)
    assert [r["id"] for r in a] != [r["id"] for r in mix_examples(_sources(), weights, total=40, seed=8)]
    assert collections.Counter(r["id"][0] for r in a) == {"g": 30, "m": 10}
    assert len({r["id"] for r in a if r["id"][0] == "g"}) == 30  # enough rows: no repeats


@pytest.mark.parametrize(
    ("weights", "total", "match"),
    [
        ({"general": 1.0, "code": 0.5}, 10, "missing.*code"),
        ({"general": 1.0, "math": -0.1}, 10, "non-negative.*math"),
        ({"general": 0.0, "math": 0.0}, 10, "all zero"),
        ({"general": float("nan")}, 10, "finite"),
        ({"general": 1.0}, 0, "total"),
        ({"empty": 1.0}, 10, "empty"),
    ],
)
def test_mix_refuses_bad_weights(weights, total, match):
    sources = {**_sources(), "empty": []}
    with pytest.raises(UserError, match=match):
        mix_examples(sources, weights, total=total, seed=0)


# ---------------------------------------------------------------- learning-rate table


# The paper's table (Lasby et al., 2025, arXiv 2504.08838, Appendix A), cell by cell; None = the paper ran none.
PAPER_TABLE = {
    "Llama-3.2-1B-Instruct": (1_235_814_400, (1.25e-5, 1.25e-5, 1.25e-5, 2.0e-5, 5.0e-5)),
    "Llama-3.2-3B-Instruct": (3_212_749_824, (7.5e-6, 7.5e-6, 7.5e-6, 1.25e-5, 2.0e-5)),
    "Qwen-2.5-0.5B-Instruct": (494_032_768, (1.25e-5, 1.25e-5, 1.25e-5, None, None)),
    "Qwen-2.5-1.5B-Instruct": (1_543_714_304, (1.25e-5, 1.25e-5, 1.25e-5, None, None)),
    "Qwen-2.5-3B-Instruct": (3_085_938_688, (7.5e-6, 7.5e-6, 7.5e-6, None, None)),
}
# each column as (sparsity, kind)
COLUMN_INPUTS = {
    "50 %": (0.5, "unstructured"),
    "2:4": (0.5, "nm"),
    "50 % layer-pruned": (0.5, "layer"),
    "66 %": (0.66, "unstructured"),
    "75 %": (0.75, "unstructured"),
}


@pytest.mark.parametrize("row", PAPER_TABLE)
def test_every_cell_of_the_paper_table_for_its_own_draft(row):
    num_params, rates = PAPER_TABLE[row]
    assert tuple(COLUMN_INPUTS) == COLUMNS
    for column, rate in zip(COLUMNS, rates, strict=True):
        if rate is None:
            continue
        lr, row_name, column_name, note = learning_rate_choice(num_params, *COLUMN_INPUTS[column])
        assert (lr, row_name, column_name) == (rate, row, column), note
        assert note == f"row {row} (the paper's own draft), column {column}"


def test_qwen_rows_agree_with_the_llama_rows_of_their_tier():
    small, large = LLAMA_ROWS
    for row in QWEN_ROWS:
        tier = small if row.rates["50 %"] == small.rates["50 %"] else large
        assert row.rates == {c: tier.rates[c] for c in ("50 %", "2:4", "50 % layer-pruned")}, row.name
    assert QWEN_ROWS[-1].rates["50 %"] == large.rates["50 %"]


def test_a_size_not_in_the_table_takes_the_nearest_llama_row_at_least_as_large():
    small = learning_rate_choice(135_000_000, 0.5, "unstructured")
    assert (small.lr, small.row, small.column) == (1.25e-5, "Llama-3.2-1B-Instruct", "50 %")
    assert small.source == "SD² Appendix A, row Llama-3.2-1B-Instruct (nearest size ≥ 135M), column 50 %"
    assert learning_rate_choice(135_000_000, 0.75, "unstructured").lr == 5.0e-5
    middle = learning_rate_choice(2_000_000_000, 0.5, "unstructured")
    assert (middle.lr, middle.row) == (7.5e-6, "Llama-3.2-3B-Instruct") and "nearest size ≥ 2B" in middle.note
    assert learning_rate_choice(2_000_000_000, 0.66, "unstructured").lr == 1.25e-5
    huge = learning_rate_choice(70_000_000_000, 0.75, "unstructured")
    assert (huge.lr, huge.row) == (2.0e-5, "Llama-3.2-3B-Instruct") and "above the largest" in huge.note
    # a paper Qwen draft at a sparsity the paper never ran on it falls back to the size rule, and says so
    qwen = learning_rate_choice(494_032_768, 0.75, "unstructured")
    assert (qwen.lr, qwen.row) == (5.0e-5, "Llama-3.2-1B-Instruct")
    assert "no 75 % Qwen-2.5-0.5B-Instruct" in qwen.note


def test_smaller_and_sparser_drafts_get_higher_rates():
    sizes = [135_000_000, LLAMA_ROWS[0].num_params, 2_000_000_000, LLAMA_ROWS[1].num_params, 70_000_000_000]
    for sparsity in (0.5, 0.66, 0.75):
        rates = [default_learning_rate(size, sparsity, "unstructured") for size in sizes]
        assert rates == sorted(rates, reverse=True), sparsity
    for row in LLAMA_ROWS:
        rates = [default_learning_rate(row.num_params, s, "unstructured") for s in (0.5, 0.66, 0.75)]
        assert rates == sorted(rates) and len(set(rates)) == 3, row.name


def test_the_kind_picks_the_column_and_odd_sparsities_say_which_column_stands_in():
    size = 1_000_000_000
    assert [learning_rate_choice(size, 0.5, kind).column for kind in ("unstructured", "nm", "layer")] == [
        "50 %",
        "2:4",
        "50 % layer-pruned",
    ]
    dense = learning_rate_choice(size, 0.0, "dense")
    assert (dense.lr, dense.column) == (1.25e-5, "50 %") and "no dense draft" in dense.note
    assert learning_rate_choice(size, 0.0) == dense  # no kind at sparsity 0: dense
    assert learning_rate_choice(size, 0.5) == learning_rate_choice(size, 0.5, "unstructured")
    assert learning_rate_choice(size, 2 / 3, "unstructured").column == "66 %"
    assert learning_rate_choice(size, 0.72, "unstructured").column == "75 %"
    assert "nearest column to 72 %" in learning_rate_choice(size, 0.72, "unstructured").note
    assert learning_rate_choice(size, 0.3, "unstructured").column == "50 %"
    assert "only N:M column is 2:4" in learning_rate_choice(size, 0.25, "nm").note
    assert "layer-prunes only 50 %" in learning_rate_choice(size, 0.25, "layer").note


@pytest.mark.parametrize(
    ("num_params", "sparsity", "kind", "match"),
    [
        (0, 0.5, "unstructured", "num_params must be a positive integer.*got 0"),
        (-5, 0.5, "unstructured", "got -5"),
        (True, 0.5, "unstructured", "got True"),
        (1.5e9, 0.5, "unstructured", "got 1500000000.0"),
        (10**9, 1.0, "unstructured", r"sparsity must be a fraction in \[0, 1\).*got 1.0"),
        (10**9, -0.1, "unstructured", "got -0.1"),
        (10**9, float("nan"), "unstructured", "got nan"),
        (10**9, "0.5", "unstructured", "got '0.5'"),
        (10**9, 0.5, "blocks", "unknown kind of sparsity 'blocks'; valid: " + ", ".join(KINDS)),
        (10**9, 0.5, "dense", "a dense draft has sparsity 0, got 0.5"),
        (10**9, 0.0, "nm", "kind 'nm' needs a sparsity in \\(0, 1\\), got 0"),
    ],
)
def test_learning_rate_table_refuses_bad_input(num_params, sparsity, kind, match):
    with pytest.raises(UserError, match=match):
        learning_rate_choice(num_params, sparsity, kind)


def test_an_explicit_rate_wins_and_lr_scale_multiplies_only_the_table():
    size = 135_000_000
    assert learning_rate(FinetuneConfig(learning_rate=3e-4, lr_scale=8.0), size, 0.5, "nm") == (
        3e-4,
        "set in the config (learning_rate)",
    )
    lr, source = learning_rate(FinetuneConfig(lr_scale=8.0), size, 0.5, "nm")
    assert lr == pytest.approx(1e-4)
    assert (
        source == "SD² Appendix A, row Llama-3.2-1B-Instruct (nearest size ≥ 135M), column 2:4: 1.25e-05 × lr_scale 8"
    )
    assert learning_rate(FinetuneConfig(), size, 0.5, "nm") == (1.25e-5, learning_rate_choice(size, 0.5, "nm").source)
    assert profile("cpu").finetune.lr_scale == 8.0 and profile("paper").finetune.lr_scale == 1.0


# ---------------------------------------------------------------- the finetune stage


def _rows(out: Path, progress) -> dict:
    (out / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES))
    return {"kind": "general"}


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A store with the tiny random Llama (the smoke model), its drafts and one distilled source."""
    from sd2_core.models import model_recipe
    from sd2_core.pruning.oneshot import layer_prune_recipe, prune_recipe

    store = Store(str(tmp_path_factory.mktemp("finetune-stage") / "store"))
    model = produce(store, model_recipe(store, "tiny-random-llama"))
    distilled = produce(store, Recipe("distill", {"rows": "EXAMPLES"}, (), _rows))
    base = profile("smoke").prune
    drafts = {"dense": model}
    for name in ("sgpt-50", "sgpt-75", "sgpt-2:4"):
        drafts[name] = produce(store, prune_recipe(store, model, variant_prune(name, base)))
    drafts["layer-50"] = produce(store, layer_prune_recipe(store, model, variant_prune("layer-50", base)))
    return store, drafts, [distilled]


def _finetune(stage_inputs, variant: str, **changes) -> dict:
    store, drafts, distilled = stage_inputs
    cfg = profile("smoke").finetune.model_copy(update={"mix": {"general": 1.0}, "learning_rate": None, **changes})
    return produce(store, finetune_recipe(store, drafts[variant], distilled, cfg)).summary


def test_the_stage_records_the_rate_it_chose_and_trains_75_percent_drafts_twice_as_long(stage_inputs):
    store, drafts, _ = stage_inputs
    size = drafts["dense"].summary["total_params"]
    at_75 = _finetune(stage_inputs, "sgpt-75", lr_scale=4.0)
    assert (at_75["steps"], at_75["steps_factor"]) == (8, 2.0)  # smoke's 4 steps, doubled
    assert at_75["lr"] == pytest.approx(4 * 5.0e-5)
    assert at_75["lr_source"] == (
        f"SD² Appendix A, row Llama-3.2-1B-Instruct (nearest size ≥ {size / 1e6:.3g}M), column 75 %: 5e-05 × lr_scale 4"
    )
    assert (at_75["sparsity_kind"], at_75["sparsity_target_fraction"]) == ("unstructured", 0.75)
    at_50 = _finetune(stage_inputs, "sgpt-50")
    assert (at_50["steps"], at_50["steps_factor"], at_50["lr"]) == (4, 1.0, 1.25e-5)
    assert at_50["lr_source"].endswith("column 50 %")
    assert _finetune(stage_inputs, "sgpt-75", high_sparsity_steps_factor=1.0)["steps"] == 4


def test_the_stage_passes_the_kind_of_sparsity_and_an_explicit_rate_wins(stage_inputs):
    store, drafts, _ = stage_inputs
    assert _finetune(stage_inputs, "sgpt-2:4")["lr_source"].endswith("column 2:4")
    layer = _finetune(stage_inputs, "layer-50")
    assert layer["lr_source"].endswith("column 50 % layer-pruned") and layer["sparsity_kind"] == "layer"
    # the row is looked up by the model layer pruning started from, not what is left of it
    assert layer["lr_params"] == drafts["dense"].summary["total_params"] > layer["total_params"]
    dense = _finetune(stage_inputs, "dense")
    assert dense["sparsity_kind"] == "dense" and "no dense draft" in dense["lr_source"]
    given = _finetune(stage_inputs, "sgpt-75", learning_rate=1e-3, lr_scale=8.0)
    assert (given["lr"], given["lr_source"], given["steps"]) == (1e-3, "set in the config (learning_rate)", 8)
