"""What a store holds, for people: one line per artifact (stage, key, what it is, size, when) and manifest lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sd2_core.errors import UserError
from sd2_core.store import Store


def _finetune(config: dict[str, Any], summary: dict[str, Any]) -> str:
    loss = f"{summary.get('loss_first', 0):.3f} → {summary.get('loss_last', 0):.3f}"
    return f"{summary.get('steps', config.get('steps'))} steps, lr {summary.get('lr')}: loss {loss}"


# A few words per stage that say which artifact this is, from its config and summary.
_DESCRIBE: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "model": lambda c, s: f"{c.get('ref')} ({s.get('layers')} layers)",
    "distill": lambda c, s: (
        f"{c.get('source', {}).get('kind')} from {c.get('source', {}).get('uri')}: "
        f"{s.get('rows')} rows, {s.get('fallbacks')} fallbacks"
    ),
    "prune": lambda c, s: f"SparseGPT {c.get('sparsity')}: sparsity {s.get('sparsity', 0):.3f}",
    "layerprune": lambda c, s: f"layer pruning {c.get('sparsity')}: dropped blocks {s.get('dropped')}",
    "finetune": _finetune,
    "reference": lambda c, s: f"greedy reference, {s.get('prompts')} prompts × {c.get('max_new_tokens')} tokens",
    "mal": lambda c, s: f"k={c.get('k')}: MAL {s.get('mal', 0):.3f}, c {s.get('c', 0):.3f}",
    "accuracy": lambda c, s: (
        f"lm-eval {', '.join(s.get('tasks', {}))} (limit {c.get('limit')}): avg {s.get('average', 0):.3f}"
    ),
    "perplexity": lambda c, s: f"perplexity {s.get('perplexity', 0):.2f} over {s.get('tokens_scored')} tokens",
    "latency": lambda c, s: f"decode step at context {c.get('context_len')}: {1000 * s.get('median_s', 0):.2f} ms",
    "results": lambda c, s: f"sweep {s.get('name')}: {s.get('cells')} cells, {s.get('failed')} failed",
}


def _describe(manifest: dict[str, Any]) -> str:
    describe = _DESCRIBE.get(manifest["stage"])
    return describe(manifest.get("config", {}), manifest.get("summary", {})) if describe else ""


def list_artifacts(store: Store, stage: str | None = None) -> list[dict[str, Any]]:
    """Every complete artifact (optionally of one stage), oldest first."""
    rows = [
        {
            "stage": m["stage"],
            "key": m["key"],
            "summary": _describe(m),
            "bytes": sum(f.get("bytes", 0) for f in m.get("files", {}).values()),
            "created": m.get("created", ""),
            "uri": store.uri_of(m["stage"], m["key"]),
        }
        for m in store.list(stage)
    ]
    return sorted(rows, key=lambda r: (r["created"], r["stage"], r["key"]))


def find_manifest(store: Store, key: str) -> dict[str, Any]:
    """The manifest of `stage/key`, of a bare key (unique prefixes accepted), or of an artifact URI."""
    text = key.strip().rstrip("/")
    if text.startswith(store.uri + "/"):
        text = text[len(store.uri) + 1 :]
    if "/" in text:
        stage, _, bare = text.partition("/")
        return store.manifest(stage, bare)
    matches = [m for m in store.list() if m["key"].startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no complete artifact with key {key!r} in store {store.uri}; `sd2 artifacts ls` lists them")
    found = ", ".join(f"{m['stage']}/{m['key']}" for m in matches)
    raise UserError(f"key {key!r} matches several artifacts ({found}); give more of it or stage/key")


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
