"""The artifact framework: what identifies a stage's result, and how that result is built and published once.

A stage describes its result as a `Recipe`: the stage's name, its config, its input artifacts, the module
whose code makes it, and a build function. The recipe's key — a hash of all of that — is the one identity
of the result. The store either holds that key complete (manifest written last) or not at all, and
"done" means exactly that: Prefect's cache key is the same key and Prefect reads its cached result from
the store (tasks/stage_tasks.py), so there is no second cache to keep in step.

The code part of the key is a digest of the source of the stage's module and of every sd2_core module it
imports (comments, docstrings and formatting left out), so editing the science invalidates what it built
and nobody bumps a number by hand.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sd2_core import __version__
from sd2_core.errors import UserError
from sd2_core.store import ArtifactRef, Store, artifact_key, file_sha256

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Build = Callable[[Path, Progress | None], dict[str, Any]]

STAGES = (
    "model",
    "distill",
    "prune",
    "layerprune",
    "finetune",
    "reference",
    "mal",
    "serve_target",
    "serve",
    "accuracy",
    "perplexity",
    "latency",
    "results",
)
# Modules that name, move or check bytes but never compute them: their edits keep cached results valid.
# (config's values are part of every key already; the store and this module only address artifacts.)
PLUMBING = frozenset({"sd2_core", "sd2_core.artifacts", "sd2_core.store", "sd2_core.errors", "sd2_core.config"})


@dataclass(frozen=True)
class Recipe:
    """Everything that determines one artifact, and how to build it; `key` is computed once, here."""

    stage: str
    config: dict[str, Any]
    inputs: tuple[ArtifactRef, ...]
    build: Build = field(compare=False, repr=False)
    code: str = field(default="", compare=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")
        digest = code_digest(self.code) if self.code else ""
        object.__setattr__(self, "key", artifact_key(self.stage, self.config, list(self.inputs), digest))


def produce(store: Store, recipe: Recipe, progress: Progress | None = None) -> ArtifactRef:
    """The complete artifact of a recipe: read from the store when there, else built in scratch and published."""
    if store.is_complete(recipe.stage, recipe.key):
        log.info("%s %s: found complete in the store, nothing to do", recipe.stage, recipe.key)
        return store.ref(recipe.stage, recipe.key)
    log.info("%s %s: building", recipe.stage, recipe.key)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"sd2-{recipe.stage}-") as tmp:
        summary = recipe.build(Path(tmp), progress)
        seconds = round(time.time() - start, 3)
        return store.publish(
            recipe.stage,
            recipe.key,
            Path(tmp),
            config=recipe.config,
            inputs=list(recipe.inputs),
            timings={"seconds": seconds},
            summary={**summary, "seconds": seconds},
            versions=versions(),
        )


WALL_CLOCK = frozenset({"seconds", "tokens_per_second"})


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write one of an artifact's JSON files without wall-clock figures (at any depth).

    Timings vary from run to run and belong in the manifest's summary; kept out of the files, a rebuilt
    deterministic artifact has the same digest, and what was built from it stays cached.
    """

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in WALL_CLOCK}
        return [strip(v) for v in value] if isinstance(value, list) else value

    path.write_text(json.dumps(strip(record), indent=2, default=str))


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest (for people; the key holds the code digest)."""
    import torch
    import transformers

    return {
        "sd2": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


_PACKAGE_DIR = Path(__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    """The source file of an sd2_core module (its package's __init__.py for a package), without importing it."""
    parts = name.split(".")[1:]
    base = _PACKAGE_DIR.joinpath(*parts)
    candidates = (base.with_suffix(".py"), base / "__init__.py") if parts else (base / "__init__.py",)
    return next((c for c in candidates if c.is_file()), None)


def _sd2_imports(tree: ast.AST) -> set[str]:
    """sd2_core modules a module imports (anywhere, lazy imports included); `from pkg import mod` counts mod."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sd2_core"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd2_core"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return found


def _normalised_source(tree: ast.Module) -> str:
    """The module's code without docstrings: edits to prose or layout do not change it."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                body[0] = ast.Pass()
    return ast.dump(tree, include_attributes=False)


@cache
def code_digest(module: str) -> str:
    """Digest of a module's code and of every sd2_core module it imports, transitively (plumbing aside)."""
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or (name in PLUMBING and name != module):
            continue
        path = _module_file(name)
        if path is None:
            raise ValueError(f"code_digest: {name!r} is not an importable Python module")
        tree = ast.parse(path.read_text(), filename=str(path))
        pending.extend(sorted(_sd2_imports(tree)))
        seen[name] = hashlib.sha256(_normalised_source(tree).encode()).hexdigest()
    return hashlib.sha256("".join(f"{n}:{seen[n]};" for n in sorted(seen)).encode()).hexdigest()[:16]


def data_identity(uri: str) -> dict[str, Any]:
    """Content digest of the data a stage reads, so that editing a file invalidates what was built from it.

    'embedded' and 'specbench' name files shipped inside sd2; a local path is hashed; hub ids are
    identified by name only (pin a revision in the id for exact reproducibility).
    """
    from sd2_core.data import EMBEDDED_DIR

    if uri in ("embedded", "specbench"):
        h = hashlib.sha256()
        for f in sorted(EMBEDDED_DIR.glob("*.jsonl")):
            h.update(f.name.encode() + file_sha256(f).encode())
        return {"data_sha256": h.hexdigest()}
    path = Path(uri).expanduser()
    return {"data_sha256": file_sha256(path)} if path.is_file() else {}


def find_artifact(store: Store, text: str) -> ArtifactRef | None:
    """The complete artifact of this store a reference names ('stage/key', 'artifact:stage/key', its URI or
    its folder), or None when it names none."""
    text = text.rstrip("/")
    for prefix in (store.uri + "/", "artifact:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    else:
        path = Path(text).expanduser()
        if store.is_local and path.is_dir() and path.resolve().parent.parent == Path(store.root):
            text = f"{path.resolve().parent.name}/{path.name}"
    parts = text.split("/")
    if len(parts) == 2 and parts[0] in STAGES and store.is_complete(parts[0], parts[1]):
        return store.ref(parts[0], parts[1])
    return None


def require_artifact(store: Store, text: str, stage: str, what: str) -> ArtifactRef:
    """`find_artifact`, for a reference that must name a complete artifact of `stage`."""
    found = find_artifact(store, text)
    if found is None or found.stage != stage:
        raise UserError(
            f"{what} {text!r} is not a complete {stage} artifact of store {store.uri} "
            f"(pass what the {stage} command printed as key, as {stage}/<key>)"
        )
    return found
