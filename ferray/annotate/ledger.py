"""The ledger of finished shards in OUT: which units are done, stale or superseded; pruning and clean-up."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

from ferray.annotate.job import Job
from ferray.annotate.media import SHARD_NAME, Unit, UnitKey
from ferray.annotate.stage import annotation_stats
from ferray.config import StorageSettings
from ferray.data import io
from ferray.data.schema import MEDIA_VIDEO
from ferray.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard of OUT: its run key (model version + settings), units and stats."""

    shard: str
    run_key: str
    units: tuple[UnitKey, ...]
    stats: dict[str, Any]


class Ledger:
    """Finished units of one run key, read from OUT's markers and stats."""

    def __init__(self, records: list[ShardRecord], run_key: str) -> None:
        self.records = records
        self.current = [r for r in records if r.run_key == run_key]
        self.others = [r for r in records if r.run_key != run_key]
        self._done: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
        for record in self.current:
            for relpath, size, segment, segments in record.units:
                self._done[(relpath, size)].add((segment, segments))

    def done(self, unit: Unit) -> bool:
        return (unit.segment, unit.segments) in self._done.get((unit.relpath, unit.size), ())

    def covers(self, file: io.TreeFile) -> bool:
        """Every unit of the file is finished; for a video, every segment of some segmentation."""
        relpath = file.relpath if file.relpath is not None else io.printable(file.member)
        found = self._done.get((relpath, file.size))
        if not found:
            return False
        return any(all((k, total) in found for k in range(total)) for total in {total for _, total in found})

    def stale(self, listing: Mapping[str, int]) -> list[ShardRecord]:
        """Finished shards holding a file that SOURCE now lists with another size (replaced in place)."""
        return [r for r in self.current if any(listing.get(relpath, size) != size for relpath, size, _, _ in r.units)]


def read_ledger(out: str, storage: StorageSettings, threads: int = 8) -> list[ShardRecord]:
    """Every marked shard of OUT with its stats; unmarked files are leftovers of a crash, not records."""
    names = marked_shards(out, storage)
    sink = io.ShardSink(out, storage)

    def read(name: str) -> ShardRecord | None:
        try:
            stats = io.read_json(sink.stats_uri(name), storage)
        except FileNotFoundError:
            log.warning("annotate: shard %s has a marker but no stats; it will be redone", name)
            return None
        if "run_key" not in stats:
            raise InputError(f"{out} holds shards that ferray annotate did not write ({name}); choose another OUT")
        units = tuple(tuple(unit) for unit in stats["units"])
        return ShardRecord(name, stats["run_key"], units, stats)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [record for record in pool.map(read, names) if record is not None]


def marked_shards(out: str, storage: StorageSettings) -> list[str]:
    fs, path = io.url_to_fs(out, storage)
    folder = io.join(path, io.MARKERS)
    if not fs.exists(folder):
        return []
    return sorted(posixpath.basename(p)[: -len(".json")] for p in fs.ls(folder, detail=False) if p.endswith(".json"))


def shard_files(out: str, storage: StorageSettings) -> dict[str, list[str]]:
    """Shard name → its data, quarantine and stats files present in OUT (markers not included)."""
    fs, path = io.url_to_fs(out, storage)
    found: dict[str, list[str]] = defaultdict(list)
    for folder, suffix in ((path, ".parquet"), (io.join(path, io.QUARANTINE), ".parquet"), (io.join(path, io.STATS), ".json")):
        if not fs.exists(folder):
            continue
        for item in fs.ls(folder, detail=False):
            name = posixpath.basename(item)
            if name.endswith(suffix) and SHARD_NAME.match(name[: -len(suffix)]):
                found[name[: -len(suffix)]].append(item)
    return found


def remove_shard(out: str, storage: StorageSettings, name: str) -> None:
    """Marker first, so a crash half-way leaves unmarked files (cleaned later), never a marked partial shard."""
    fs, path = io.url_to_fs(out, storage)
    sink = io.ShardSink(out, storage)
    for uri in (sink.marker_uri(name), sink.data_uri(name), sink.quarantine_uri(name), sink.stats_uri(name)):
        target = io.url_to_fs(uri, storage)[1]
        if fs.exists(target):
            fs.rm(target)


def remove_unmarked(out: str, storage: StorageSettings) -> int:
    """Delete shard files that no marker vouches for (a run stopped between writing and marking)."""
    marked = set(marked_shards(out, storage))
    fs, _ = io.url_to_fs(out, storage)
    removed = 0
    for name, paths in shard_files(out, storage).items():
        if name not in marked:
            for item in paths:
                fs.rm(item)
            removed += 1
    if removed:
        log.info("annotate: removed the files of %d unmarked shards left by an interrupted run", removed)
    return removed


def unit_relpath(name: str, media_type: str | None) -> str:
    return name.rsplit("@", 1)[0] if media_type == MEDIA_VIDEO else name


def read_shard_rows(out: str, storage: StorageSettings, shard: str, columns: list[str] | None = None) -> pa.Table:
    """A finished shard's rows, ok and quarantined together."""
    sink = io.ShardSink(out, storage)
    tables = [io.read_parquet(sink.data_uri(shard), storage, columns)]
    if io.exists(sink.quarantine_uri(shard), storage):
        tables.append(io.read_parquet(sink.quarantine_uri(shard), storage, columns))
    return pa.concat_tables(tables)


def prune_replaced(job: Job, record: ShardRecord, sizes: dict[str, int]) -> None:
    """Drop the rows of files replaced in place (listed with another size) from a finished shard."""
    gone = {relpath for relpath, size, _, _ in record.units if sizes.get(relpath, size) != size}
    keep = tuple(key for key in record.units if key[0] not in gone)
    if not keep:
        remove_shard(job.out, job.storage, record.shard)
        return
    table = read_shard_rows(job.out, job.storage, record.shard)
    mask = [unit_relpath(u, m) not in gone for u, m in zip(table["unit"].to_pylist(), table["media_type"].to_pylist())]
    table = table.filter(pa.array(mask, pa.bool_()))
    counters = {"video_seconds": record.stats.get("extra", {}).get("video_seconds", 0.0)}
    stats = annotation_stats(record.shard, table, keep, job.run_key, job.model.version, counters)
    fingerprint = hashlib.sha256(f"{job.run_key}\n{json.dumps(keep)}".encode()).hexdigest()
    io.ShardSink(job.out, job.storage).write(record.shard, table, fingerprint, stats)
    log.info("annotate: %s: dropped the rows of %d files replaced since", record.shard, len(gone))
