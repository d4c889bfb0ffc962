"""`ferray ingest`: a dataset layout → Parquet shards with SPEC's columns, on Ray Data."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa

from ferray import executor
from ferray.config import ConfigError, IngestSettings, Settings, StorageSettings
from ferray.data import io
from ferray.data.datasets import READERS, Entry
from ferray.data.datasets.fer2013 import BAD_PIXELS, pixels_to_png
from ferray.data.images import DecodeError, open_checked
from ferray.data.schema import INGEST_SCHEMA, STATUS_OK, canonical_label, status
from ferray.executor import ShardUnit, Stage, Summary

log = logging.getLogger(__name__)


def row_id(dataset: str, relpath: str) -> str:
    """Stable id: the same dataset file gets the same id from a folder, a zip or S3, run after run."""
    return hashlib.blake2b(f"{dataset}/{relpath}".encode(), digest_size=10).hexdigest()


def _read_entry(entry: Entry, tree: io.Tree, settings: IngestSettings) -> tuple[bytes | None, str, str | None]:
    """(bytes, status, error) of one entry; only named, expected failures become statuses."""
    if entry.status != STATUS_OK:
        return None, entry.status, entry.error
    if entry.pixels is not None:
        try:
            return pixels_to_png(entry.pixels), STATUS_OK, None
        except ValueError as error:
            return None, BAD_PIXELS, str(error)
    assert entry.member is not None
    if entry.size > settings.limits.max_file_bytes:
        return None, status("decode", "too_large"), f"{entry.size} bytes > limit {settings.limits.max_file_bytes}"
    try:
        data = tree.read(entry.member)
    except io.READ_ERRORS as error:
        reason, message = io.read_failure(error)
        return None, status("read", reason), message
    try:
        open_checked(data, settings.limits)
    except DecodeError as error:
        # Keep the bytes of a rejected file (within the size limit) so the quarantine can be inspected.
        return data, error.status, str(error)
    return data, STATUS_OK, None


def build_shard(entries: list[Entry], tree: io.Tree, dataset: str, source: str, settings: IngestSettings) -> pa.Table:
    """Rows of one shard, in SPEC's ingest schema."""
    columns: dict[str, list[Any]] = {name: [] for name in INGEST_SCHEMA.names}
    for entry in entries:
        data, row_status, error = _read_entry(entry, tree, settings)
        label, label_name = canonical_label(entry.label_name) if entry.label_name else (None, None)
        columns["id"].append(row_id(dataset, entry.relpath))
        columns["dataset"].append(dataset)
        columns["split"].append(entry.split)
        columns["source_path"].append(tree.member_uri(entry.member) if entry.member else io.join(source, entry.relpath))
        columns["label"].append(label)
        columns["label_name"].append(label_name)
        columns["image"].append(data)
        columns["status"].append(row_status)
        columns["error"].append(error)
    return pa.table(columns, schema=INGEST_SCHEMA)


class IngestStage(Stage):
    """Builds shards from listing entries: reads and checks each file, in SPEC's ingest schema."""

    name = "ingest"
    version = 1
    schema = INGEST_SCHEMA

    def __init__(self, dataset: str, source: str, settings: IngestSettings, storage: StorageSettings) -> None:
        self.dataset, self.source, self.settings, self.storage = dataset, source, settings, storage
        self.tree: io.Tree | None = None

    def setup(self) -> None:
        self.tree = io.Tree(self.source, self.storage)  # one archive handle per actor, not per shard

    def __call__(self, payload: Any, table: pa.Table | None, extra: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        assert self.tree is not None
        return build_shard(payload, self.tree, self.dataset, self.source, self.settings), {}


def plan_shards(dataset: str, entries: list[Entry], settings: IngestSettings) -> list[ShardUnit]:
    """Sort entries by path and cut fixed-size shards; names and keys are deterministic."""
    ordered = sorted(entries, key=lambda e: e.relpath)
    units = []
    knobs = json.dumps({"dataset": dataset, **settings.model_dump(mode="json")}, sort_keys=True)
    for index, start in enumerate(range(0, len(ordered), settings.shard_rows)):
        chunk = ordered[start : start + settings.shard_rows]
        digest = hashlib.sha256(knobs.encode())
        for entry in chunk:
            digest.update(repr((entry.relpath, entry.member, entry.size, entry.split, entry.label_name,
                                entry.status, entry.pixels)).encode())
        units.append(ShardUnit(f"part-{index:05d}", digest.hexdigest(), chunk))
    return units


def run(settings: Settings, dataset: str, source: str, out: str) -> Summary:
    """Ingest SOURCE as DATASET into OUT; finished shards from an identical earlier run are skipped."""
    if dataset not in READERS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    started = time.perf_counter()
    storage = settings.storage
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    tree = io.Tree(source, storage)
    listing = READERS[dataset](tree, tree.files(), settings.ingest)
    tree.close()
    units = plan_shards(dataset, listing.entries, settings.ingest)
    log.info("ingest %s: %d entries in %d shards", dataset, len(listing.entries), len(units))
    summary = Summary(stage="ingest", source=source, out=out, ignored=listing.ignored)
    executor.run(IngestStage(dataset, source, settings.ingest, storage), units, source, out, storage, settings.ray, summary)
    summary.seconds = round(time.perf_counter() - started, 2)
    executor.write_meta(out, summary, settings, storage, dataset=dataset)
    return summary
