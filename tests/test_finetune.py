"""Sparse fine-tuning: zeros stay zero, the loss falls, only responses carry loss, mixing and LR table.

The tokenizer is the real SmolLM2 one (session fixture ``smollm2_tokenizer`` from conftest.py);
where that fixture is absent, a small real WordLevel tokenizer trained in memory with its own chat
template stands in. The label tests run on both.
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from sd2_core.chat import IGNORE_INDEX, tokenize_chat_example
from sd2_core.config import FinetuneConfig
from sd2_core.data.mixing import mix_examples
from sd2_core.errors import UserError
from sd2_core.finetune import finetune_sparse, warmup_linear_decay
from sd2_core.learning_rates import SPARSITY_COLUMNS, default_learning_rate

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
    result = finetune_sparse(model, chat_tokenizer, EXAMPLES, cfg, num_params_for_lr=3_000_000_000, sparsity_for_lr=0.5)
    assert result["lr"] == default_learning_rate(3_000_000_000, 0.5)


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


def test_learning_rate_table_is_monotone_and_maps_to_nearest_row():
    sizes = [494_000_000, 1_236_000_000, 1_544_000_000, 3_100_000_000]
    for size in sizes:
        rates = [default_learning_rate(size, s) for s in SPARSITY_COLUMNS]
        assert rates == sorted(rates) and len(set(rates)) == len(rates), "higher sparsity should not lower the lr"
    for s in SPARSITY_COLUMNS:
        rates = [default_learning_rate(size, s) for size in sizes]
        assert rates == sorted(rates, reverse=True), "a larger model should not get a larger lr"
    assert default_learning_rate(135_000_000, 0.5) == default_learning_rate(494_000_000, 0.5)  # below the table
    assert default_learning_rate(70_000_000_000, 0.0) == default_learning_rate(3_100_000_000, 0.0)  # above it
    assert default_learning_rate(3_210_000_000, 0.0) == default_learning_rate(3_090_000_000, 0.0)
    assert default_learning_rate(1_236_000_000, 0.49) == default_learning_rate(1_236_000_000, 0.5)
    assert 1e-6 <= default_learning_rate(1_236_000_000, 0.0) <= 1e-4


@pytest.mark.parametrize(
    ("num_params", "sparsity"), [(0, 0.5), (-5, 0.0), (10**9, 1.0), (10**9, -0.1), (10**9, float("nan"))]
)
def test_learning_rate_table_refuses_bad_input(num_params, sparsity):
    with pytest.raises(UserError):
        default_learning_rate(num_params, sparsity)
