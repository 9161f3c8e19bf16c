"""What a store holds, for people: one line per artifact (stage, key, what it is, size, when) and manifest lookup."""

from __future__ import annotations

from typing import Any

from sd2_core.errors import UserError
from sd2_core.store import Store


def _describe(manifest: dict[str, Any]) -> str:
    """A few words that say which artifact this is, from its config and summary."""
    stage, config, summary = manifest["stage"], manifest.get("config", {}), manifest.get("summary", {})
    if stage == "model":
        return f"{config.get('ref')} ({summary.get('layers')} layers)"
    if stage == "distill":
        source = config.get("source", {})
        rows, fallbacks = summary.get("rows"), summary.get("fallbacks")
        return f"{source.get('kind')} from {source.get('uri')}: {rows} rows, {fallbacks} fallbacks"
    if stage == "prune":
        return f"SparseGPT {config.get('sparsity')}: sparsity {summary.get('sparsity', 0):.3f}"
    if stage == "layerprune":
        return f"layer pruning {config.get('sparsity')}: dropped blocks {summary.get('dropped')}"
    if stage == "finetune":
        loss = f"{summary.get('loss_first', 0):.3f} → {summary.get('loss_last', 0):.3f}"
        return f"{config.get('steps')} steps, lr {summary.get('lr')}: loss {loss}"
    if stage == "reference":
        return f"greedy reference, {summary.get('prompts')} prompts × {config.get('max_new_tokens')} tokens"
    if stage == "mal":
        return f"k={config.get('k')}: MAL {summary.get('mal', 0):.3f}, c {summary.get('c', 0):.3f}"
    if stage == "results":
        return f"sweep {summary.get('name')}: {summary.get('cells')} cells, {summary.get('failed')} failed"
    return ""


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
