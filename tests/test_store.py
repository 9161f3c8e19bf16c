"""The artifact store on a local folder and on a real S3 server: manifest last, digests, listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3server import s3_server

from sd2_core.errors import UserError
from sd2_core.store import MANIFEST, Store, artifact_key


def _publish(store: Store, tmp_path: Path, key: str = "k1", payload: str = "hello"):
    src = tmp_path / f"src-{key}"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "a.txt").write_text(payload)
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 100)
    return store.publish(
        "demo",
        key,
        src,
        config={"x": 1},
        inputs=[],
        timings={"seconds": 1.0},
        summary={"rows": 2},
        versions={"sd2": "test"},
    )


def _roundtrip(store: Store, tmp_path: Path) -> None:
    assert not store.is_complete("demo", "k1")
    ref = _publish(store, tmp_path)
    assert store.is_complete("demo", "k1")
    manifest = store.manifest("demo", "k1")
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    assert manifest["digest"] == ref.digest and manifest["summary"] == {"rows": 2}
    local = store.local_dir(ref)
    assert (local / "a.txt").read_text() == "hello"
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 100
    # a complete artifact is never rewritten: publishing other content under the same key keeps the first
    again = _publish(store, tmp_path, payload="other")
    assert again.digest == ref.digest and store.read_text(ref, "a.txt") == "hello"
    assert [m["key"] for m in store.list()] == ["k1"]
    assert [m["key"] for m in store.list("demo")] == ["k1"]


def test_local_store_roundtrip(tmp_path: Path) -> None:
    _roundtrip(Store(str(tmp_path / "store")), tmp_path)


def test_artifact_without_manifest_is_not_done(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    ref = _publish(store, tmp_path)
    Path(store.root, "demo", "k1", MANIFEST).unlink()
    assert not store.is_complete("demo", "k1")
    assert list(store.list()) == []
    with pytest.raises(UserError, match="no complete artifact"):
        store.manifest("demo", "k1")
    # the next publish completes it again
    assert _publish(store, tmp_path).digest == ref.digest


def test_store_rejects_bad_uri(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="gs://x"):
        Store("gs://x")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        Store(str(afile))


def test_key_depends_on_every_ingredient() -> None:
    from sd2_core.store import ArtifactRef

    inp = ArtifactRef(stage="model", key="m", uri="u", digest="d1")
    base = artifact_key("prune", {"s": "0.5"}, [inp], "v1")
    assert base == artifact_key("prune", {"s": "0.5"}, [inp], "v1")
    assert base != artifact_key("prune", {"s": "2:4"}, [inp], "v1")
    assert base != artifact_key("prune", {"s": "0.5"}, [inp.model_copy(update={"digest": "d2"})], "v1")
    assert base != artifact_key("prune", {"s": "0.5"}, [inp], "v2")
    assert base != artifact_key("finetune", {"s": "0.5"}, [inp], "v1")


def test_s3_store_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD2_CACHE", str(tmp_path / "cache"))
    with s3_server("sd2-store-test"):
        store = Store("s3://sd2-store-test/runs")
        _roundtrip(store, tmp_path)
        assert store.uri_of("demo", "k1") == "s3://sd2-store-test/runs/demo/k1"
        manifest = json.loads(store.fs.cat_file("sd2-store-test/runs/demo/k1/manifest.json"))
        assert manifest["key"] == "k1"


def test_concurrent_publishers_of_one_key_leave_one_whole_artifact(tmp_path: Path) -> None:
    """Two cells that share a stage may build it at the same time: one build wins whole, none is mixed or lost."""
    from concurrent.futures import ThreadPoolExecutor

    from sd2_core.store import file_sha256

    store = Store(str(tmp_path / "store"))
    builds = []
    for i in range(6):
        folder = tmp_path / f"build{i}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes([i]) * 3_000_000)
        (folder / "note.txt").write_text(f"build {i}")
        builds.append(folder)

    def publish(folder: Path):
        return store.publish(
            "prune", "k1", folder, config={}, inputs=[], timings={}, summary={"from": folder.name}, versions={}
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        refs = list(pool.map(publish, builds))
    manifest = store.manifest("prune", "k1")
    assert {r.digest for r in refs} == {manifest["digest"]}  # every caller gets the artifact that stands
    folder = Path(store.uri) / "prune" / "k1"
    for name, meta in manifest["files"].items():
        assert file_sha256(folder / name) == meta["sha256"]
    winner = (folder / "note.txt").read_text()
    assert (folder / "weights.bin").read_bytes() == bytes([int(winner.split()[-1])]) * 3_000_000
    assert [p.name for p in (Path(store.uri) / "prune").iterdir()] == ["k1"]  # no staging debris
