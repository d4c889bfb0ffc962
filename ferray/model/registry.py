"""Model registry in object storage: versioned artifact folders, a `current.json` pointer, decisions.

Layout under a registry URI (conventionally `…/models`):

    <version>/model.keras, ferray.json …   an artifact folder, copied whole; opaque to the registry
    <version>/_ferray/published.json       written last: the version is complete (files, sha256, metrics)
    current.json                           {"version", "uri", "promoted_at", "metrics", "decision", …}
    decisions/<time>-<version>-<rand>.json one record per promote/reject decision, never rewritten

Every object is written whole (`ferray.data.io.write_bytes_atomic`: a rename locally, a single PUT on S3),
so a reader sees the old pointer or the new one, never half of one. Concurrent promoters are
last-writer-wins on the pointer; each keeps its own decision record, which names the version it
replaced, so the history shows any race.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import uuid
from typing import Any, Mapping

from ferray.config import StorageSettings
from ferray.data import io
from ferray.model import META_FILE, MODEL_FILE

log = logging.getLogger(__name__)

CURRENT = "current.json"
DECISIONS = "decisions"
PUBLISHED = "published.json"
MANIFEST_FILE = META_FILE
# MODEL = "default" names the model shipped inside ferray; the model loader locates it, so
# `resolve` hands the word back unchanged (the hook for that loader).
DEFAULT_MODEL = "default"
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
_CHUNK = 8 * 1024 * 1024


class RegistryError(io.StorageError):
    """A registry or model cannot be resolved (no current model, unknown version); one line."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def version_name(digest: str, when: dt.datetime) -> str:
    """`YYYYMMDDTHHMMSSZ-<8 hex>`: sorts by publish time; the content hash tells artifacts apart."""
    return f"{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{digest[:8]}"


def artifact_files(artifact: str, storage: StorageSettings) -> dict[str, int]:
    """Relative path → size of every file of an artifact folder, registry metadata (`_ferray/`) excluded."""
    fs, root = io.url_to_fs(artifact, storage)
    if not fs.isdir(root):
        raise RegistryError(f"not an artifact folder: {artifact}")
    files: dict[str, int] = {}
    for full, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = io.safe_relpath(full[len(root) :].lstrip("/"))
        if rel is None or rel.split("/", 1)[0] == io.META:
            continue
        files[rel] = int(info.get("size") or 0)
    if MODEL_FILE not in files:
        raise RegistryError(f"not an artifact folder (no {MODEL_FILE}): {artifact}")
    return dict(sorted(files.items()))


def _file_sha256(uri: str, storage: StorageSettings) -> str:
    # Streamed, so hashing a large model.keras never holds it in memory.
    fs, path = io.url_to_fs(uri, storage)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _artifact_metrics(artifact: str, storage: StorageSettings) -> dict[str, Any]:
    """The `metrics` of the artifact's ferray.json when it has them; the registry needs nothing else."""
    manifest = io.join(artifact, MANIFEST_FILE)
    if not io.exists(manifest, storage):
        return {}
    try:
        data = io.read_json(manifest, storage)
    except ValueError:  # not JSON: the artifact is opaque here, its loader will complain
        return {}
    metrics = data.get("metrics") if isinstance(data, dict) else None
    return metrics if isinstance(metrics, dict) else {}


class Registry:
    """One registry folder (local or `s3://`): publish versions, promote or reject, read history."""

    def __init__(self, uri: str, storage: StorageSettings) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage

    def version_uri(self, version: str) -> str:
        return io.join(self.uri, version)

    def _published_uri(self, version: str) -> str:
        return io.join(self.uri, version, io.META, PUBLISHED)

    # -- versions -------------------------------------------------------------------------------

    def publish(self, artifact: str, *, metrics: Mapping[str, Any] | None = None,
                when: dt.datetime | None = None) -> str:
        """Copy an artifact folder into `<version>/` and mark it complete; `current` is not moved."""
        when = when or utc_now()
        files = artifact_files(artifact, self.storage)
        hashes = {rel: _file_sha256(io.join(artifact, rel), self.storage) for rel in files}
        digest = hashlib.sha256("".join(f"{rel}\0{sha}\n" for rel, sha in hashes.items()).encode()).hexdigest()
        version = version_name(digest, when)
        marker = self._published_uri(version)
        if io.exists(marker, self.storage) and io.read_json(marker, self.storage).get("sha256") == digest:
            log.info("registry: %s already published as %s", artifact, version)
            return version
        target = self.version_uri(version)
        for rel in files:
            data = io.read_bytes(io.join(artifact, rel), self.storage)
            io.write_bytes_atomic(io.join(target, rel), data, self.storage)
        record = {
            "version": version,
            "source": artifact,
            "published_at": _iso(when),
            "sha256": digest,
            "files": {rel: {"size": files[rel], "sha256": hashes[rel]} for rel in files},
            "metrics": dict(metrics) if metrics is not None else _artifact_metrics(artifact, self.storage),
        }
        # Written last: a version without it is a partial copy and can be neither promoted nor resolved.
        io.write_json(marker, record, self.storage)
        log.info("registry: published %s as %s (%d files)", artifact, target, len(files))
        return version

    def published(self, version: str) -> dict[str, Any]:
        """The publish record of a complete version; RegistryError for unknown or partial ones."""
        marker = self._published_uri(version)
        if not io.exists(marker, self.storage):
            raise RegistryError(f"no published version {version!r} in {self.uri}")
        return dict(io.read_json(marker, self.storage))

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        fs, root = io.url_to_fs(self.uri, self.storage)
        if not fs.exists(root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        return sorted(n for n in names if VERSION_PATTERN.match(n) and io.exists(self._published_uri(n), self.storage))

    # -- pointer and decisions -----------------------------------------------------------------

    def current(self) -> dict[str, Any] | None:
        """The `current.json` pointer, or None before the first promotion."""
        pointer = io.join(self.uri, CURRENT)
        return dict(io.read_json(pointer, self.storage)) if io.exists(pointer, self.storage) else None

    def promote(self, version: str, decision: Mapping[str, Any] | None = None, *,
                when: dt.datetime | None = None) -> dict[str, Any]:
        """Record a decision on `version`; move `current.json` to it only if `decision["promote"]`.

        `decision` carries whatever the gate compared (metric, both scores, tolerance, reason); it
        is stored as given. None means a manual promotion. Returns the decision record.
        """
        decision = dict(decision) if decision is not None else {"promote": True, "reason": "manual"}
        # No default: a gate that forgot to say must not promote by accident.
        promote = decision.get("promote")
        if not isinstance(promote, bool):
            raise ValueError(f"decision['promote'] must be true or false, got {promote!r}")
        published = self.published(version)
        when = when or utc_now()
        before = self.current()
        record = {
            **decision,
            "version": version,
            "uri": self.version_uri(version),
            "decided_at": _iso(when),
            "previous": before.get("version") if before else None,
        }
        # Time first so names sort chronologically; a random tail so two writers deciding on the
        # same version in the same microsecond still get a record each.
        name = f"{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S.%fZ}-{version}-{uuid.uuid4().hex[:6]}.json"
        record_uri = io.join(self.uri, DECISIONS, name)
        # The record goes first: a crash before the pointer moves leaves a record of an intent,
        # never a pointer that no record explains.
        io.write_json(record_uri, record, self.storage)
        if promote:
            pointer = {
                "version": version,
                "uri": self.version_uri(version),
                "promoted_at": _iso(when),
                "metrics": decision.get("metrics", published.get("metrics", {})),
                "sha256": published["sha256"],
                "previous": record["previous"],
                "decision": f"{DECISIONS}/{name}",
            }
            io.write_json(io.join(self.uri, CURRENT), pointer, self.storage)
            log.info("registry: current -> %s (was %s)", version, record["previous"])
        else:
            log.info("registry: rejected %s; current stays %s", version, record["previous"])
        return record

    def history(self) -> list[dict[str, Any]]:
        """Every decision record, oldest first."""
        fs, root = io.url_to_fs(io.join(self.uri, DECISIONS), self.storage)
        if not fs.exists(root):
            return []
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
        return [dict(io.read_json(io.join(self.uri, DECISIONS, p.rsplit("/", 1)[-1]), self.storage)) for p in paths]


def resolve(uri: str, storage: StorageSettings) -> str:
    """The artifact a MODEL argument names: a registry resolves `current.json`; folders pass through.

    `default` is returned unchanged for the model loader, which knows where the shipped model is.
    """
    if uri == DEFAULT_MODEL:
        return uri
    base = uri.rstrip("/")
    if base.endswith(".keras"):
        return base
    pointer = io.join(base, CURRENT)
    if io.exists(pointer, storage):
        version = io.read_json(pointer, storage)["version"]
        # The version, not the stored URI, so a registry copied to another bucket still resolves.
        return io.join(base, version)
    if io.exists(io.join(base, MODEL_FILE), storage):
        return base
    published = Registry(base, storage).versions()
    if published:
        raise RegistryError(f"registry {uri} has no current model yet ({len(published)} published); promote one")
    raise RegistryError(f"no model at {uri}: neither a model folder ({MODEL_FILE}) nor a registry ({CURRENT})")
