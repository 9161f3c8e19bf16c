"""WikiText-2 perplexity, the paper's measure for its layer-wise sparsity study.

The text is the raw test split as one string (lines joined with "\n\n", the way SparseGPT and the Hugging Face
perplexity guide read it), tokenized once without special tokens. A window of `context_len` tokens starts every
`stride` tokens; each window scores only the tokens no earlier window scored (the first window all but its first
token), with the tokens before them in that window as context. With stride = context_len (the default, as in
SparseGPT's evaluation) the windows are disjoint. Perplexity = exp(mean negative log-likelihood per scored token).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sd2_core.artifacts import Progress, Recipe, write_json
from sd2_core.errors import UserError
from sd2_core.store import ArtifactRef, Store, file_sha256


def wikitext_path(uri: str) -> Path:
    """The text file a perplexity config names: the shipped WikiText-2 test split, or a local file."""
    if uri == "embedded":
        from sd2_core.data import embedded_path

        return embedded_path("eval/wikitext2_test.raw")
    path = Path(uri).expanduser()
    if not path.is_file():
        raise UserError(f"perplexity text {uri!r} is not a file; valid: 'embedded' or a local text file")
    return path


def text_token_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text's lines (blank ones dropped, CRLF or LF) joined by blank lines, as one row of token ids."""
    joined = "\n\n".join(line for line in text.splitlines() if line.strip())
    ids = tokenizer(joined, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens is not None else ids


@torch.no_grad()
def perplexity(
    model: Any, ids: torch.Tensor, context_len: int, stride: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Perplexity of `model` on the token row `ids` over sliding windows (see the module docstring)."""
    if not 1 <= stride <= context_len:
        raise UserError(f"stride must be in 1 .. context_len ({context_len}), got {stride}")
    if ids.numel() < 2:
        raise UserError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    nll, scored, windows, end_prev = 0.0, 0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    for done, start in enumerate(starts):
        end = min(start + context_len, ids.numel())
        window = ids[start:end].unsqueeze(0).to(device)
        first = max(end_prev, start + 1) - start  # first position of this window nobody scored yet
        if first < window.shape[1]:
            logits = model(input_ids=window).logits[0, first - 1 : -1].float()
            targets = window[0, first:]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            scored += targets.numel()
            windows += 1
        end_prev = end
        if progress is not None and (done % 8 == 0 or done == len(starts) - 1):
            progress(done + 1, len(starts), f"perplexity, {scored} tokens scored")
        if end == ids.numel():
            break
    return {
        "perplexity": math.exp(nll / scored),
        "nll_per_token": nll / scored,
        "tokens_scored": scored,
        "windows": windows,
        "context_len": context_len,
        "stride": stride,
    }


def perplexity_recipe(store: Store, model: ArtifactRef, cfg: Any) -> Recipe:
    """The `perplexity` stage: one model artifact's perplexity on the configured text."""
    from sd2_core.models import load_artifact
    from sd2_core.placement import placement_of

    placement = placement_of(cfg)
    path = wikitext_path(cfg.uri)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        loaded, tokenizer = load_artifact(store, model, placement.dtype, placement.device)
        ids = text_token_ids(tokenizer, path.read_text(encoding="utf-8"), cfg.max_tokens)
        result = {**perplexity(loaded, ids, cfg.context_len, cfg.stride, progress), "text": cfg.uri}
        write_json(out / "perplexity.json", result)
        return result

    config = {
        **cfg.model_dump(mode="json", exclude={"device", "dtype", "enabled"}),
        "placement": placement.identity,
        "data_sha256": file_sha256(path),
    }
    return Recipe("perplexity", config, (model,), build, code=__name__)
