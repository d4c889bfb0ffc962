"""`ferray ingest`: a dataset layout → Parquet shards with SPEC's columns, on Ray Data."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ferray import io
from ferray.config import IngestSettings, Settings, StorageSettings
from ferray.datasets import READERS, Entry
from ferray.datasets.fer2013 import BAD_PIXELS, pixels_to_png
from ferray.images import DecodeError, open_checked
from ferray.schema import INGEST_SCHEMA, STATUS_OK, canonical_label, status
from ferray.shards import Summary, shard_stats

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
    if entry.size > settings.max_file_bytes:
        return None, status("decode", "too_large"), f"{entry.size} bytes > limit {settings.max_file_bytes}"
    try:
        data = tree.read(entry.member)
    except FileNotFoundError:
        return None, status("read", "missing"), "listed but gone when read"
    except (OSError, EOFError, KeyError, ValueError) as error:  # unreadable object, corrupt archive member
        return None, status("read", "error"), f"{type(error).__name__}: {error}"[:300]
    try:
        open_checked(data, settings.max_file_bytes, settings.max_image_pixels)
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


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its name, input fingerprint and entries."""

    shard: str
    fingerprint: str
    entries: list[Entry]


def ingest_shard(item: dict[str, Any], dataset: str, source: str, out: str, settings: IngestSettings,
                 storage: StorageSettings) -> dict[str, Any]:
    """Ray Data map function: build, split and write one shard; return its stats."""
    task: ShardTask = pickle.loads(item["task"])
    tree = io.Tree(source, storage)
    try:
        table = build_shard(task.entries, tree, dataset, source, settings)
    finally:
        tree.close()
    stats = shard_stats(task.shard, table)
    io.ShardSink(out, storage).write(task.shard, table, task.fingerprint, stats)
    return {"stats": json.dumps(stats)}


def plan_shards(dataset: str, entries: list[Entry], settings: IngestSettings) -> list[ShardTask]:
    """Sort entries by path and cut fixed-size shards; names and fingerprints are deterministic."""
    ordered = sorted(entries, key=lambda e: e.relpath)
    tasks = []
    knobs = json.dumps({"dataset": dataset, **settings.model_dump(mode="json")}, sort_keys=True)
    for index, start in enumerate(range(0, len(ordered), settings.shard_rows)):
        chunk = ordered[start : start + settings.shard_rows]
        digest = hashlib.sha256(knobs.encode())
        for entry in chunk:
            digest.update(repr((entry.relpath, entry.member, entry.size, entry.split, entry.label_name,
                                entry.status, entry.pixels)).encode())
        tasks.append(ShardTask(f"part-{index:05d}", digest.hexdigest(), chunk))
    return tasks


def run(settings: Settings, dataset: str, source: str, out: str) -> Summary:
    """Ingest SOURCE as DATASET into OUT; finished shards from an identical earlier run are skipped."""
    from ferray.runtime import ensure_ray  # Ray starts only when there is work to plan

    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    started = time.perf_counter()
    storage = settings.storage.resolved()
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    tree = io.Tree(source, storage)
    listing = READERS[dataset](tree, tree.files(), settings.ingest)
    tree.close()
    tasks = plan_shards(dataset, listing.entries, settings.ingest)
    summary = Summary(stage="ingest", source=source, out=out, ignored=listing.ignored)
    sink = io.ShardSink(out, storage)
    pending = []
    for task in tasks:
        done = sink.completed(task.shard, task.fingerprint)
        if done is None:
            pending.append(task)
        else:
            summary.add(done)
            summary.shards_skipped += 1
    log.info("ingest %s: %d entries in %d shards (%d already done)", dataset, len(listing.entries), len(tasks), summary.shards_skipped)
    if pending:
        import ray

        ensure_ray(settings.ray)
        # One block per shard, so Ray schedules shards as independent, retriable tasks.
        results = (
            ray.data.from_items([{"task": pickle.dumps(task)} for task in pending], override_num_blocks=len(pending))
            .map(ingest_shard, fn_kwargs={"dataset": dataset, "source": source, "out": out,
                                          "settings": settings.ingest, "storage": storage}, num_cpus=1)
            .take_all()
        )
        for result in results:
            summary.add(json.loads(result["stats"]))
        summary.shards_written = len(results)
    summary.seconds = round(time.perf_counter() - started, 2)
    io.write_json(io.join(out, io.META, "ingest.json"),
                  {"dataset": dataset, "summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
    return summary
