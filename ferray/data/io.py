"""One way to reach storage (plain paths, `file://`, `s3://`): trees, shard sinks, markers, stats."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ferray.config import StorageSettings
from ferray.errors import StorageError

log = logging.getLogger(__name__)

QUARANTINE = "_quarantine"
STATS = "_stats"
MARKERS = "_markers"
META = "_ferray"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def _s3_options(storage: StorageSettings) -> dict[str, Any]:
    # No listings cache: s3fs would keep every object's info dict of a listing (~1.2 KB each beyond what
    # ferray keeps: ~12 GB for a 10-million-file SOURCE) for the life of the process, and a long-lived
    # driver would not see new files.
    options: dict[str, Any] = {"anon": storage.anon, "use_listings_cache": False}
    if storage.access_key_id is not None:
        options["key"] = storage.access_key_id.get_secret_value()
    if storage.secret_access_key is not None:
        options["secret"] = storage.secret_access_key.get_secret_value()
    if storage.session_token is not None:
        options["token"] = storage.session_token.get_secret_value()
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    return options


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local scheme (`s3://…`)."""
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with `/`, whatever the scheme."""
    return posixpath.join(uri.rstrip("/"), *parts)


def url_to_fs(uri: str, storage: StorageSettings) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI or plain path to (filesystem, path inside it)."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        fs = _s3(storage)
        return fs, uri.split("://", 1)[1].rstrip("/")
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    fs = LocalFileSystem()
    return fs, fs._strip_protocol(path)


@functools.lru_cache(maxsize=8)
def _s3_cached(key: str, storage: StorageSettings) -> fsspec.AbstractFileSystem:
    import s3fs  # noqa: F401  (imported for its registration with fsspec)

    return fsspec.filesystem("s3", **_s3_options(storage))


def _s3(storage: StorageSettings) -> fsspec.AbstractFileSystem:
    return _s3_cached(storage.model_dump_json(), storage)


def exists(uri: str, storage: StorageSettings) -> bool:
    fs, path = url_to_fs(uri, storage)
    return bool(fs.exists(path))


def read_bytes(uri: str, storage: StorageSettings) -> bytes:
    fs, path = url_to_fs(uri, storage)
    return bytes(fs.cat_file(path))


def write_bytes_atomic(uri: str, data: bytes, storage: StorageSettings) -> None:
    """Write a whole object so readers see the old state or the new, never half a file."""
    fs, path = url_to_fs(uri, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        # Beside the target, but short: a target name near NAME_MAX must still get a temp file.
        folder, name = posixpath.split(path)
        tmp = posixpath.join(folder, f".{name[:40]}.tmp-{uuid.uuid4().hex}")
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    else:
        # A single PUT is atomic in S3: the object appears whole or not at all.
        fs.pipe_file(path, data)


def write_json(uri: str, payload: Any, storage: StorageSettings) -> None:
    write_bytes_atomic(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), storage)


def read_json(uri: str, storage: StorageSettings) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_parquet(table: pa.Table, uri: str, storage: StorageSettings) -> None:
    buffer = pa.BufferOutputStream()
    # Dictionaries only where values repeat (status, split, label and backbone names): on image bytes
    # and embeddings Arrow would build one, find it useless and fall back, at twice the write's cost.
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    pq.write_table(table, buffer, compression="zstd", use_dictionary=strings)
    write_bytes_atomic(uri, buffer.getvalue().to_pybytes(), storage)


def read_parquet(uri: str, storage: StorageSettings, columns: list[str] | None = None) -> pa.Table:
    fs, path = url_to_fs(uri, storage)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


# What reading one listed file can raise besides a bug: an object gone or unreadable, a corrupt archive member.
READ_ERRORS = (OSError, EOFError, KeyError, ValueError)


def read_failure(error: BaseException) -> tuple[str, str]:
    """(reason, message) of a failed read of one listed file, for a `read:<reason>` status."""
    if isinstance(error, FileNotFoundError):
        return "missing", "listed but gone when read"
    return "error", f"{type(error).__name__}: {error}"[:300]


def check_reachable(uri: str, storage: StorageSettings, must_exist: bool) -> None:
    """Fail early, with one line, when storage is unreachable or an input is missing."""
    try:
        fs, path = url_to_fs(uri, storage)
        found = fs.exists(path)
    except Exception as error:  # any client error here means "cannot reach it"; say so in one line
        raise StorageError(f"cannot reach {uri}: {type(error).__name__}: {error}") from None
    if must_exist and not found:
        raise StorageError(f"not found: {uri}")


# ---------------------------------------------------------------------------------------------
# Trees: a folder, an archive, or an object-store prefix, listed as relative POSIX paths.


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes the OS could not decode (surrogates) become `%XX`.

    Local and tar names that are not UTF-8 reach Python as lone surrogates, which neither hashing
    (row ids) nor Arrow strings accept; the escaped form keeps such a file a normal row.
    """
    if not any("\udc80" <= char <= "\udcff" for char in name):
        return name
    return "".join(f"%{ord(char) - 0xDC00:02X}" if "\udc80" <= char <= "\udcff" else char for char in name)


def safe_relpath(name: str) -> str | None:
    """A member name normalised to a printable relative path, or None if it would escape its root."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return None
    parts = [part for part in clean.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        return None
    return printable("/".join(parts))


@dataclass(frozen=True, slots=True)
class TreeFile:
    """One file of a tree: its relative path (None if unsafe), member name and size in bytes."""

    relpath: str | None
    member: str
    size: int


class Tree:
    """Read-only view of a SOURCE: a directory or prefix, or a zip/tar archive anywhere."""

    def __init__(self, uri: str, storage: StorageSettings) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.fs, self.path = url_to_fs(uri, storage)
        lower = self.uri.lower()
        # A single non-archive file (e.g. `fer2013.csv`) is a tree of one member.
        self.kind = "zip" if lower.endswith(".zip") else "tar" if lower.endswith(ARCHIVE_SUFFIXES) else (
            "dir" if not self.fs.isfile(self.path) else "file")
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Open archive handles do not travel to Ray workers; each worker reopens lazily.
        return {"uri": self.uri, "storage": self.storage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["storage"])  # type: ignore[misc]

    def _open_archive(self) -> zipfile.ZipFile | tarfile.TarFile:
        if self._archive is None:
            self._handle = self.fs.open(self.path, "rb")
            if self.kind == "zip":
                self._archive = zipfile.ZipFile(self._handle)
            else:
                self._archive = tarfile.open(fileobj=self._handle, mode="r:*")
        return self._archive

    def files(self) -> list[TreeFile]:
        """Every file, sorted by member name; directories are not files."""
        if self.kind == "file":
            name = posixpath.basename(self.path)
            out = [TreeFile(name, name, int(self.fs.size(self.path)))]
        elif self.kind == "dir":
            if not self.fs.isdir(self.path):
                raise StorageError(f"not a folder or archive: {self.uri}")
            # One flat listing (on S3: pages of 1,000 keys, not a request per folder); only (path, size) is
            # kept of each object's info, and nothing stays in s3fs's cache (see _s3_options).
            out = []
            for full, info in self.fs.find(self.path, detail=True).items():
                if info.get("type") == "directory":
                    continue
                member = full[len(self.path) :].lstrip("/")
                out.append(TreeFile(safe_relpath(member), member, int(info.get("size") or 0)))
        elif self.kind == "zip":
            archive = self._open_archive()
            assert isinstance(archive, zipfile.ZipFile)
            out = [
                TreeFile(safe_relpath(info.filename), info.filename, info.file_size)
                for info in archive.infolist()
                if not info.is_dir()
            ]
        else:
            archive = self._open_archive()
            assert isinstance(archive, tarfile.TarFile)
            out = [
                TreeFile(safe_relpath(info.name), info.name, info.size)
                for info in archive.getmembers()
                if info.isfile()
            ]
        return sorted(out, key=lambda f: f.member)

    def member_uri(self, member: str) -> str:
        """Where a member is, as printable text for `source_path` columns (reads use the member)."""
        return printable(self.uri if self.kind == "file" else join(self.uri, member))

    def read(self, member: str) -> bytes:
        """The bytes of one member; never extracts anything to disk."""
        if self.kind == "file":
            return bytes(self.fs.cat_file(self.path))
        if self.kind == "dir":
            return bytes(self.fs.cat_file(join(self.path, member)))
        with self.open(member) as handle:
            return handle.read()

    def open(self, member: str) -> BinaryIO:
        """A binary handle on one member, read lazily (a video need not be read whole)."""
        if self.kind == "file":
            return self.fs.open(self.path, "rb")
        if self.kind == "dir":
            return self.fs.open(join(self.path, member), "rb")
        archive = self._open_archive()
        if isinstance(archive, zipfile.ZipFile):
            return archive.open(member)  # type: ignore[return-value]
        extracted = archive.extractfile(member)
        if extracted is None:
            raise FileNotFoundError(member)
        return extracted  # type: ignore[return-value]

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
        if self._handle is not None:
            self._handle.close()
        self._archive = self._handle = None


# ---------------------------------------------------------------------------------------------
# Shard outputs: `OUT/<shard>.parquet` (ok rows), `OUT/_quarantine/<shard>.parquet` (the rest),
# `OUT/_stats/<shard>.json`, and `OUT/_markers/<shard>.json` written last.


class ShardSink:
    """Deterministic, marker-guarded writer of one output folder's shards."""

    def __init__(self, out_uri: str, storage: StorageSettings) -> None:
        self.out = out_uri.rstrip("/")
        self.storage = storage

    def data_uri(self, shard: str) -> str:
        return join(self.out, f"{shard}.parquet")

    def quarantine_uri(self, shard: str) -> str:
        return join(self.out, QUARANTINE, f"{shard}.parquet")

    def stats_uri(self, shard: str) -> str:
        return join(self.out, STATS, f"{shard}.json")

    def marker_uri(self, shard: str) -> str:
        return join(self.out, MARKERS, f"{shard}.json")

    def completed(self, shard: str, fingerprint: str) -> dict[str, Any] | None:
        """The shard's stats if it was finished from the same input, else None."""
        marker = self.marker_uri(shard)
        if not exists(marker, self.storage):
            return None
        done = read_json(marker, self.storage)
        if done.get("fingerprint") != fingerprint:
            return None
        return read_json(self.stats_uri(shard), self.storage)

    def write(self, shard: str, table: pa.Table, fingerprint: str, stats: dict[str, Any]) -> None:
        """Split rows by status, write data, quarantine and stats, then the completion marker."""
        # A row without a status is not ok: it goes to quarantine rather than out of both files.
        ok_mask = pc.fill_null(pc.equal(table["status"], "ok"), False)
        if pc.all(ok_mask).as_py() is not False:  # the usual shard (or an empty one): no copy
            good, bad = table, table.slice(0, 0)
        else:
            good, bad = table.filter(ok_mask), table.filter(pc.invert(ok_mask))
        write_parquet(good, self.data_uri(shard), self.storage)
        quarantine = self.quarantine_uri(shard)
        if bad.num_rows:
            write_parquet(bad, quarantine, self.storage)
        else:
            # A rerun after a fix must not leave the old run's rejects beside the new output.
            fs, path = url_to_fs(quarantine, self.storage)
            if fs.exists(path):
                fs.rm(path)
        write_json(self.stats_uri(shard), stats, self.storage)
        write_json(self.marker_uri(shard), {"shard": shard, "fingerprint": fingerprint}, self.storage)


def completed_shards(out_uri: str, storage: StorageSettings) -> list[str]:
    """URIs of the data shards of a finished stage output, in shard order."""
    fs, path = url_to_fs(out_uri, storage)
    marker_dir = join(path, MARKERS)
    if not fs.exists(marker_dir):
        if fs.exists(join(path, META)):  # a finished run that had nothing to write (an empty SOURCE)
            return []
        raise StorageError(f"no finished shards under {out_uri} (no {MARKERS}/)")
    names = sorted(posixpath.basename(p)[: -len(".json")] for p in fs.ls(marker_dir, detail=False) if p.endswith(".json"))
    return [join(out_uri, f"{name}.parquet") for name in names]


def read_stats(out_uri: str, storage: StorageSettings) -> list[dict[str, Any]]:
    """Every shard's stats of an output folder."""
    fs, path = url_to_fs(out_uri, storage)
    stats_dir = join(path, STATS)
    if not fs.exists(stats_dir):
        return []
    return [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(stats_dir, detail=False)) if p.endswith(".json")]


def read_table(uris: Iterable[str], storage: StorageSettings, columns: list[str] | None = None) -> pa.Table:
    """Concatenate shards into one table (small outputs and tests; stages stream instead)."""
    tables = [read_parquet(uri, storage, columns) for uri in uris]
    return pa.concat_tables(tables) if tables else pa.table({})


def fetch_cached(uri: str, storage: StorageSettings, cache_dir: str | None = None) -> str:
    """A local copy of a remote file (model weights, Dlib models), downloaded once per machine."""
    if not is_remote(uri):
        return uri[len("file://") :] if uri.startswith("file://") else uri
    folder = Path(cache_dir or os.path.expanduser("~/.cache/ferray/fetched"))
    fs, path = url_to_fs(uri, storage)
    info = fs.info(path)
    # Keyed by URI, size and ETag/mtime, so an object replaced in place is fetched again.
    version = f"{uri}|{info.get('size')}|{info.get('ETag') or info.get('LastModified') or info.get('mtime')}"
    target = folder / hashlib.sha256(version.encode()).hexdigest()[:16] / posixpath.basename(uri)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(read_bytes(uri, storage))
        tmp.replace(target)
    return str(target)
