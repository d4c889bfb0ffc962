"""Model registry: publish, promote, reject, resolve and concurrent pointer writes, locally and on S3."""

from __future__ import annotations

import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ferray.data import io
from ferray.config import StorageSettings
from ferray.model.registry import (
    CURRENT,
    DECISIONS,
    DEFAULT_MODEL,
    VERSION_PATTERN,
    Registry,
    RegistryError,
    resolve,
)

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh root on local disk or on the session's S3 endpoint (moto starts only when asked)."""
    if request.param == "local":
        return str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/registry-{request.node.name.replace('[', '-').rstrip(']')}-{tmp_path.name}"


@pytest.fixture()
def storage() -> StorageSettings:
    # Resolved at use time, after s3_endpoint (if requested) has set the AWS_* variables.
    return StorageSettings().resolved()


def make_artifact(root: str, storage: StorageSettings, tag: str, accuracy: float) -> str:
    """A stand-in artifact: the registry copies files and never opens the model."""
    io.write_bytes_atomic(io.join(root, "model.keras"), f"weights {tag}".encode() * 100, storage)
    io.write_json(io.join(root, "ferray.json"), {"labels": 7, "metrics": {"accuracy": accuracy}}, storage)
    io.write_bytes_atomic(io.join(root, "assets", "notes.txt"), tag.encode(), storage)
    return root


def test_publish_promote_resolve(base: str, storage: StorageSettings) -> None:
    registry = Registry(io.join(base, "models"), storage)
    a = make_artifact(io.join(base, "runs", "a"), storage, "a", 0.60)
    b = make_artifact(io.join(base, "runs", "b"), storage, "b", 0.65)

    va = registry.publish(a, when=T0)
    assert VERSION_PATTERN.match(va) and va.startswith("20260102T030405Z-")
    assert io.read_bytes(io.join(registry.version_uri(va), "model.keras"), storage) == b"weights a" * 100
    assert io.read_bytes(io.join(registry.version_uri(va), "assets", "notes.txt"), storage) == b"a"
    assert registry.published(va)["metrics"] == {"accuracy": 0.60}
    assert registry.current() is None
    with pytest.raises(RegistryError, match="no current model yet"):
        resolve(registry.uri, storage)

    first = registry.promote(va, when=T0 + dt.timedelta(seconds=1))
    assert first["promote"] is True and first["previous"] is None
    assert resolve(registry.uri, storage) == registry.version_uri(va)

    vb = registry.publish(b, when=T0 + dt.timedelta(minutes=1))
    assert registry.versions() == [va, vb]
    decision = {"promote": True, "metric": "accuracy", "candidate": 0.65, "current": 0.60, "tolerance": 0.0}
    record = registry.promote(vb, decision, when=T0 + dt.timedelta(minutes=2))
    assert record["previous"] == va and record["candidate"] == 0.65
    pointer = registry.current()
    assert pointer is not None
    assert pointer["version"] == vb and pointer["metrics"] == {"accuracy": 0.65}
    assert pointer["uri"] == registry.version_uri(vb)
    assert pointer["decision"].startswith(f"{DECISIONS}/") and f"-{vb}-" in pointer["decision"]
    assert resolve(registry.uri, storage) == registry.version_uri(vb)
    assert resolve(registry.uri + "/", storage) == registry.version_uri(vb)
    assert [h["version"] for h in registry.history()] == [va, vb]


def test_reject_keeps_current(base: str, storage: StorageSettings) -> None:
    registry = Registry(io.join(base, "models"), storage)
    good = registry.publish(make_artifact(io.join(base, "good"), storage, "good", 0.62), when=T0)
    registry.promote(good, {"promote": True, "reason": "first model"}, when=T0)
    shuffled = make_artifact(io.join(base, "bad"), storage, "shuffled", 0.14)
    bad = registry.publish(shuffled, when=T0 + dt.timedelta(hours=1))

    record = registry.promote(bad, {"promote": False, "metric": "accuracy", "candidate": 0.14, "current": 0.62,
                                    "reason": "candidate below current - tolerance"},
                              when=T0 + dt.timedelta(hours=2))
    assert record["promote"] is False and record["previous"] == good
    assert registry.current()["version"] == good  # type: ignore[index]
    assert resolve(registry.uri, storage) == registry.version_uri(good)
    history = registry.history()
    assert [(h["version"], h["promote"]) for h in history] == [(good, True), (bad, False)]
    assert history[-1]["candidate"] == 0.14 and history[-1]["current"] == 0.62
    # The rejected version stays published for inspection.
    assert registry.versions() == [good, bad]


def test_decision_must_say_promote_or_not(tmp_path: Path, storage: StorageSettings) -> None:
    registry = Registry(str(tmp_path / "models"), storage)
    version = registry.publish(make_artifact(str(tmp_path / "a"), storage, "a", 0.5), when=T0)
    with pytest.raises(ValueError, match="promote"):
        registry.promote(version, {"metric": "accuracy"})
    assert registry.current() is None and registry.history() == []


def test_partial_or_unknown_version_is_refused(tmp_path: Path, storage: StorageSettings) -> None:
    registry = Registry(str(tmp_path / "models"), storage)
    # A copy that died before its `_ferray/published.json`: files present, not a version.
    partial = "20260102T030405Z-deadbeef"
    make_artifact(registry.version_uri(partial), storage, "partial", 0.5)
    assert registry.versions() == []
    with pytest.raises(RegistryError, match="no published version"):
        registry.promote(partial)
    with pytest.raises(RegistryError, match="not an artifact folder"):
        registry.publish(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no model.keras"):
        registry.publish(str(tmp_path / "empty"))


def test_resolve_passes_folders_through(base: str, storage: StorageSettings) -> None:
    artifact = make_artifact(io.join(base, "plain-model"), storage, "x", 0.5)
    assert resolve(artifact, storage) == artifact
    assert resolve(artifact + "/", storage) == artifact
    assert resolve(io.join(artifact, "model.keras"), storage) == io.join(artifact, "model.keras")
    assert resolve(DEFAULT_MODEL, storage) == DEFAULT_MODEL
    registry = Registry(io.join(base, "models"), storage)
    version = registry.publish(artifact, when=T0)
    # `…/models/<version>` is an artifact folder like any other.
    assert resolve(registry.version_uri(version), storage) == registry.version_uri(version)
    with pytest.raises(RegistryError, match="neither a model folder"):
        resolve(io.join(base, "nothing-here"), storage)


def test_version_names_sort_by_time_and_hash_content(tmp_path: Path, storage: StorageSettings) -> None:
    registry = Registry(str(tmp_path / "models"), storage)
    a = make_artifact(str(tmp_path / "a"), storage, "a", 0.5)
    b = make_artifact(str(tmp_path / "b"), storage, "b", 0.5)
    v1 = registry.publish(a, when=T0)
    v2 = registry.publish(a, when=T0 + dt.timedelta(days=1))
    v3 = registry.publish(b, when=T0 + dt.timedelta(days=2))
    assert v1.split("-")[1] == v2.split("-")[1] != v3.split("-")[1]
    assert sorted([v3, v1, v2]) == [v1, v2, v3] == registry.versions()
    # Publishing the same content in the same second is a no-op, not a second copy.
    assert registry.publish(a, when=T0) == v1
    assert registry.versions() == [v1, v2, v3]


@pytest.mark.parametrize("direction", ["local-to-s3", "s3-to-local"])
def test_publish_across_storages(direction: str, tmp_path: Path, s3_bucket: str, storage: StorageSettings) -> None:
    remote = f"{s3_bucket}/cross-{direction}-{tmp_path.name}"
    source_root, registry_root = (str(tmp_path), remote) if direction == "local-to-s3" else (remote, str(tmp_path))
    artifact = make_artifact(io.join(source_root, "artifact"), storage, direction, 0.7)
    registry = Registry(io.join(registry_root, "models"), storage)
    version = registry.promote(registry.publish(artifact), {"promote": True})["version"]
    resolved = resolve(registry.uri, storage)
    assert resolved == registry.version_uri(version)
    copied, original = (io.read_bytes(io.join(root, "model.keras"), storage) for root in (resolved, artifact))
    assert copied == original


def test_concurrent_promotions_leave_a_whole_pointer(base: str, storage: StorageSettings) -> None:
    """Many writers move the pointer while a reader polls it: every read is a whole, valid pointer."""
    registry = Registry(io.join(base, "models"), storage)
    versions = [registry.publish(make_artifact(io.join(base, f"a{i}"), storage, f"a{i}", 0.5 + i / 100),
                                 when=T0 + dt.timedelta(seconds=i)) for i in range(3)]
    registry.promote(versions[0])
    stop = threading.Event()
    seen: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            seen.append(json.loads(io.read_bytes(io.join(registry.uri, CURRENT), storage))["version"])

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            jobs = [pool.submit(registry.promote, versions[i % 3], {"promote": True, "writer": i}) for i in range(12)]
            records = [job.result() for job in jobs]
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= set(versions)
    assert registry.current()["version"] in versions  # type: ignore[index]
    # One record per decision, none lost to a shared file: 12 concurrent + the first promotion.
    history = registry.history()
    assert len(history) == 13
    assert sorted(h.get("writer", -1) for h in history) == [-1, *range(12)]
    assert all(r["version"] in versions for r in records)
    if not io.is_remote(base):
        assert not list(Path(base).rglob("*.tmp-*")), "no temporary files may be left behind"
