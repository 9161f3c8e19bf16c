"""The artifact store: one abstraction over fsspec for a local folder or any S3 bucket.

An artifact is a folder `<root>/<stage>/<key>/` whose `manifest.json` is written last: a folder
without a manifest is incomplete and is never read as done, so a crash mid-write can only leave
debris that the next run overwrites, never a half artifact that passes for a whole one. A complete
artifact is never rewritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from sd2_core.config import canonical_json
from sd2_core.errors import TransientError, UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ArtifactRef(BaseModel):
    """The small record tasks hand each other instead of tensors or models."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    uri: str
    digest: str
    summary: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def artifact_key(stage: str, config: dict[str, Any], inputs: list[ArtifactRef], code_version: str) -> str:
    """Hash of everything that determines an artifact: stage, config, input digests, code version."""
    material = {
        "stage": stage,
        "config": config,
        "inputs": [[i.stage, i.digest] for i in inputs],
        "code": code_version,
    }
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(files: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(canonical_json({k: v["sha256"] for k, v in files.items()}).encode()).hexdigest()


def cache_root() -> Path:
    """Local cache for downloaded artifacts and converted built-in models."""
    return Path(os.environ.get("SD2_CACHE", Path.home() / ".cache" / "sd2")).expanduser()


class Store:
    """Artifacts under a root URI: a local path or `s3://bucket/prefix` (s3fs, credentials from the env)."""

    def __init__(self, uri: str):
        if not uri or not isinstance(uri, str):
            raise UserError(f"store must be a local folder or s3://bucket/prefix, got {uri!r}")
        self.uri = uri.rstrip("/")
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol not in ("file", "s3", "memory"):
            raise UserError(f"unsupported store {uri!r}: use a local folder or s3://bucket/prefix")
        self.protocol = protocol
        if protocol == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
            self.fs = fsspec.filesystem("s3", **options)
            self.root = self.uri.split("://", 1)[1]
            self.fs.invalidate_cache()
        elif protocol == "memory":
            self.fs = fsspec.filesystem("memory")
            self.root = self.uri.split("://", 1)[1]
        else:
            path = Path(self.uri.split("://", 1)[1] if "://" in self.uri else self.uri).expanduser().resolve()
            if path.exists() and not path.is_dir():
                raise UserError(f"store {uri!r} exists and is not a folder")
            path.mkdir(parents=True, exist_ok=True)
            self.fs = fsspec.filesystem("file")
            self.root = str(path)
            self.uri = str(path)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def _path(self, stage: str, key: str, name: str = "") -> str:
        base = f"{self.root}/{stage}/{key}"
        return f"{base}/{name}" if name else base

    def uri_of(self, stage: str, key: str) -> str:
        prefix = "" if self.is_local else f"{self.protocol}://"
        return prefix + self._path(stage, key)

    def _io(self, what: str, fn, *args, **kwargs):
        """Run one storage call, turning OS/network failures into retryable errors."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise TransientError(f"store {self.uri}: {what} failed: {exc}") from exc

    def is_complete(self, stage: str, key: str) -> bool:
        if not self.is_local:
            self.fs.invalidate_cache(self._path(stage, key))
        return bool(self._io("exists", self.fs.exists, self._path(stage, key, MANIFEST)))

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        try:
            with self._io("read manifest", self.fs.open, self._path(stage, key, MANIFEST), "rb") as fh:
                return json.loads(fh.read().decode())
        except FileNotFoundError:
            raise UserError(f"no complete artifact {stage}/{key} in store {self.uri}") from None

    def ref(self, stage: str, key: str) -> ArtifactRef:
        m = self.manifest(stage, key)
        return ArtifactRef(
            stage=stage, key=key, uri=self.uri_of(stage, key), digest=m["digest"], summary=m.get("summary", {})
        )

    def publish(
        self,
        stage: str,
        key: str,
        local_dir: Path,
        *,
        config: dict[str, Any],
        inputs: list[ArtifactRef],
        timings: dict[str, float],
        summary: dict[str, Any],
        versions: dict[str, str],
    ) -> ArtifactRef:
        """Upload a finished local folder as artifact `stage/key`; manifest last."""
        if self.is_complete(stage, key):
            log.info("artifact %s/%s already complete; keeping the existing one", stage, key)
            return self.ref(stage, key)
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST:
                raise ValueError("an artifact's own files may not be named manifest.json")
            files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        digest = _files_digest(files)
        manifest = {
            "stage": stage,
            "key": key,
            "digest": digest,
            "config": config,
            "inputs": [i.to_dict() for i in inputs],
            "files": files,
            "timings": timings,
            "summary": summary,
            "versions": versions,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if self.is_local:
            self._publish_local(stage, key, Path(local_dir), files, data)
        else:
            for rel in files:
                self._io(f"upload {rel}", self.fs.put_file, str(Path(local_dir) / rel), self._path(stage, key, rel))
            # An S3 PUT is atomic: the manifest appears whole or not at all, after every file.
            self._io("write manifest", self.fs.pipe_file, self._path(stage, key, MANIFEST), data)
        if self.manifest(stage, key)["digest"] != digest:
            log.info("artifact %s/%s was published concurrently by another run; using that one", stage, key)
            return self.ref(stage, key)
        return ArtifactRef(stage=stage, key=key, uri=self.uri_of(stage, key), digest=digest, summary=summary)

    def _publish_local(self, stage: str, key: str, src: Path, files: dict[str, Any], manifest: bytes) -> None:
        """Build the artifact in a private sibling folder and rename it into place: readers, and concurrent
        writers of the same key, see either nothing or a whole artifact, never one being written."""
        final = Path(self._path(stage, key))
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=final.parent))
        try:
            for rel in files:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._io(f"copy {rel}", shutil.copyfile, src / rel, dest)
            with open(staging / MANIFEST, "wb") as fh:
                fh.write(manifest)
                fh.flush()
                os.fsync(fh.fileno())
            for _ in range(3):
                try:
                    os.rename(staging, final)
                    return
                except OSError:
                    if self.is_complete(stage, key):
                        return  # another writer finished first; theirs stands
                    shutil.rmtree(final, ignore_errors=True)  # debris of a crashed write: never complete
            raise TransientError(f"store {self.uri}: could not move {stage}/{key} into place")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def read_text(self, ref: ArtifactRef, name: str) -> str:
        with self._io(f"read {name}", self.fs.open, self._path(ref.stage, ref.key, name), "rb") as fh:
            return fh.read().decode()

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local folder holding the artifact's files (downloaded and verified for remote stores)."""
        manifest = self.manifest(ref.stage, ref.key)
        if self.is_local:
            return Path(self._path(ref.stage, ref.key))
        dest = cache_root() / "artifacts" / ref.stage / f"{ref.key}-{manifest['digest'][:12]}"
        done = dest / ".complete"
        if done.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".dl-", dir=dest.parent))
        try:
            for rel, meta in manifest["files"].items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self._io(f"download {rel}", self.fs.get_file, self._path(ref.stage, ref.key, rel), str(target))
                if file_sha256(target) != meta["sha256"]:
                    raise TransientError(f"{ref.stage}/{ref.key}/{rel}: digest mismatch after download")
            (staging / ".complete").write_text(manifest["digest"])
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return dest

    def list(self, stage: str | None = None) -> Iterator[dict[str, Any]]:
        """Manifests of the complete artifacts, optionally of one stage."""
        if not self.is_local:
            self.fs.invalidate_cache()
        stages = [stage] if stage else sorted(self._children(self.root))
        for st in stages:
            for key in sorted(self._children(f"{self.root}/{st}")):
                if self.is_complete(st, key):
                    yield self.manifest(st, key)

    def _children(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False) if self.fs.isdir(p)]
