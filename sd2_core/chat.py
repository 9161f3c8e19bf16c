"""The one door through which every stage turns conversations into token ids, and knows when a turn ends.

Distillation, the greedy reference, speculative decoding, fine-tuning and MACs must all see the same
rendering of a prompt, or a draft is trained on one context and measured on another. A second
tokenizer (cross-vocabulary drafting) comes through these same functions.
"""

from __future__ import annotations

from typing import Any

from sd2_core.errors import UserError

Messages = list[dict[str, str]]
IGNORE_INDEX = -100  # label of tokens that carry no loss


def render_chat(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (with the template's own special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; SD² renders every prompt with one")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as exc:  # transformers raises ValueError for a template it cannot render
        raise UserError(f"the tokenizer cannot render a chat ({exc}); use a tokenizer with a chat template") from None


def _ids(tokenizer, text: str) -> list[int]:
    # The rendered chat already carries the template's special tokens (BOS, turn markers).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_input_ids(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a conversation followed by the assistant's header: what a model continues from."""
    return _ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def eos_ids(tokenizer, generation_config: Any = None) -> list[int]:
    """Every token that ends a turn: the generation config's EOS ids (chat models often list several), then the
    tokenizer's EOS; no duplicates, in that order."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend(configured if isinstance(configured, (list, tuple)) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the tokenizer and model define no EOS token; generation could never stop early")
    return list(dict.fromkeys(int(i) for i in ids))


def model_eos_ids(tokenizer, model) -> set[int]:
    """`eos_ids` of a loaded model (its generation config), as a set for membership tests."""
    return set(eos_ids(tokenizer, getattr(model, "generation_config", None)))


def _check_messages(messages: object) -> Messages:
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError(f"messages must be a list of at least a user and an assistant turn, got {messages!r:.200}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"each message needs string 'role' and 'content', got {m!r:.200}")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"the last message must be the assistant's response, got role {messages[-1]['role']!r}")
    return messages


def tokenize_chat_example(tokenizer, messages: Messages, max_seq_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of one chat, labels IGNORE_INDEX everywhere but the final assistant response.

    Both are cut to ``max_seq_len``; when the cut removes the whole response every label is IGNORE_INDEX
    (the caller skips such rows).
    """
    if max_seq_len < 1:
        raise UserError(f"max_seq_len must be at least 1, got {max_seq_len}")
    messages = _check_messages(messages)
    prefix_ids = chat_input_ids(tokenizer, messages[:-1])
    full_ids = _ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))
    if full_ids[: len(prefix_ids)] != prefix_ids:
        pairs = zip(prefix_ids, full_ids, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prefix_ids), len(full_ids)))
        raise UserError(
            "the chat template's prompt with generation prompt does not tokenize to a prefix of the full chat "
            f"(first difference at token {at}: prefix {prefix_ids[at : at + 5]} vs full {full_ids[at : at + 5]}); "
            "the response cannot be located, use a tokenizer whose template renders the prompt as a prefix"
        )
    if len(full_ids) == len(prefix_ids):
        raise UserError(f"the assistant response renders to no tokens: {messages[-1]['content']!r:.200}")
    labels = [IGNORE_INDEX] * len(prefix_ids) + full_ids[len(prefix_ids) :]
    return full_ids[:max_seq_len], labels[:max_seq_len]


def mean_prompt_len(tokenizer, questions: list[str]) -> int:
    """Mean length in tokens of single-turn prompts as the model sees them (template and header included)."""
    lengths = [len(chat_input_ids(tokenizer, [{"role": "user", "content": q}])) for q in questions]
    return int(round(sum(lengths) / max(len(lengths), 1)))
