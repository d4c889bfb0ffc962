"""The ledger: the executor's option for stages whose shards are packed from units of work at run time.

Stages such as ingest and align name one output shard per input shard up front, and a shard is done
when its marker carries the expected fingerprint. A ledgered stage (annotate) instead packs whatever
units are still to do into new shards; each shard's stats record the run key (model and settings)
and the keys of the units it holds. Reading OUT's marked shards back gives the ledger: the units
finished under this run key, the shards of other run keys (superseded on request), and the shards
whose inputs changed since (pruned by the stage). Files no marker vouches for are leftovers of a
crash and are removed first.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

import pyarrow as pa

from ferray.config import RaySettings, StorageSettings
from ferray.data import io
from ferray.errors import InputError
from ferray.executor.pools import Pools, execute, item
from ferray.executor.stage import ShardUnit, Stage
from ferray.executor.summary import Summary

log = logging.getLogger(__name__)

# Ledgered shards are named by a hash of their run key and units (`shard_name`).
SHARD_NAME = re.compile(r"^part-[0-9a-f]{16}$")
# A stage's key for one unit of work: a tuple of JSON values (a list once read back from `_stats`).
UnitKey = tuple[Hashable, ...]


def shard_name(fingerprint: str) -> str:
    return f"part-{fingerprint[:16]}"


def entry(run_key: str, keys: Sequence[UnitKey]) -> dict[str, Any]:
    """What a ledgered shard's stats must hold besides the counts: its run key and its units."""
    return {"run_key": run_key, "units": [list(key) for key in keys]}


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard of OUT: its run key, the keys of its units and its stats."""

    shard: str
    run_key: str
    units: tuple[UnitKey, ...]
    stats: dict[str, Any]

    @classmethod
    def of(cls, stats: dict[str, Any], shard: str | None = None) -> ShardRecord:
        """A shard's record from its stats (the run key and units `entry` put there)."""
        return cls(shard or stats["shard"], stats["run_key"], tuple(tuple(unit) for unit in stats["units"]), stats)


class Ledger:
    """OUT's finished shards, split into those of `run_key` (current) and the rest (others)."""

    def __init__(self, records: list[ShardRecord], run_key: str) -> None:
        self.records = records
        self.run_key = run_key
        self.current = [r for r in records if r.run_key == run_key]
        self.others = [r for r in records if r.run_key != run_key]
        self.keys = frozenset(key for record in self.current for key in record.units)

    def done(self, key: UnitKey) -> bool:
        return key in self.keys

    def holding(self, changed: Callable[[UnitKey], bool]) -> list[ShardRecord]:
        """Current shards holding a unit for which `changed` is true (its input replaced since)."""
        return [r for r in self.current if any(changed(key) for key in r.units)]


def read(out: str, storage: StorageSettings, stage: str, threads: int = 8) -> list[ShardRecord]:
    """Every marked shard of OUT with its stats; a marker without stats is redone, not trusted."""
    names = marked_shards(out, storage)
    sink = io.ShardSink(out, storage)

    def record(name: str) -> ShardRecord | None:
        try:
            stats = io.read_json(sink.stats_uri(name), storage)
        except FileNotFoundError:
            log.warning("%s: shard %s has a marker but no stats; it will be redone", stage, name)
            return None
        if "run_key" not in stats:
            raise InputError(f"{out} holds shards that ferray {stage} did not write ({name}); choose another OUT")
        return ShardRecord.of(stats, name)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [r for r in pool.map(record, names) if r is not None]


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
        for item_path in fs.ls(folder, detail=False):
            name = posixpath.basename(item_path)
            if name.endswith(suffix) and SHARD_NAME.match(name[: -len(suffix)]):
                found[name[: -len(suffix)]].append(item_path)
    return found


def remove_shard(out: str, storage: StorageSettings, name: str) -> None:
    """Marker first, so a crash half-way leaves unmarked files (cleaned later), never a marked partial shard."""
    fs, _ = io.url_to_fs(out, storage)
    sink = io.ShardSink(out, storage)
    for uri in (sink.marker_uri(name), sink.data_uri(name), sink.quarantine_uri(name), sink.stats_uri(name)):
        target = io.url_to_fs(uri, storage)[1]
        if fs.exists(target):
            fs.rm(target)


def remove_unmarked(out: str, storage: StorageSettings, stage: str) -> int:
    """Delete shard files that no marker vouches for (a run stopped between writing and marking)."""
    marked = set(marked_shards(out, storage))
    fs, _ = io.url_to_fs(out, storage)
    removed = 0
    for name, paths in shard_files(out, storage).items():
        if name not in marked:
            for item_path in paths:
                fs.rm(item_path)
            removed += 1
    if removed:
        log.info("%s: removed the files of %d unmarked shards left by an interrupted run", stage, removed)
    return removed


def read_rows(out: str, storage: StorageSettings, shard: str, columns: list[str] | None = None) -> pa.Table:
    """A finished shard's rows, ok and quarantined together."""
    sink = io.ShardSink(out, storage)
    tables = [io.read_parquet(sink.data_uri(shard), storage, columns)]
    if io.exists(sink.quarantine_uri(shard), storage):
        tables.append(io.read_parquet(sink.quarantine_uri(shard), storage, columns))
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- a ledgered run


class Ledgered(Protocol):
    """What a ledgered stage's command supplies to `run`."""

    name: str
    run_key: str

    def prune(self, ledger: Ledger) -> int:
        """Rewrite or remove finished shards whose inputs changed; how many it touched."""

    def todo(self, ledger: Ledger) -> list[Any]:
        """The units of work the ledger does not hold yet (on the driver, before Ray starts)."""

    def shards(self, todo: list[Any]) -> tuple[Stage, list[ShardUnit], Pools]:
        """The stage, the shards the units pack into and the pool layout (Ray may start here)."""


@dataclass
class LedgerRun:
    """A ledgered run: its summary, the ledger as it stood, and the shards it wrote."""

    summary: Summary
    ledger: Ledger
    written: list[ShardRecord] = field(default_factory=list)
    changed: bool = False  # OUT changed besides new shards (leftovers removed, shards pruned or superseded)

    @property
    def finished(self) -> list[ShardRecord]:
        """Every shard of the current run key, the earlier ones and the new ones."""
        return self.ledger.current + self.written


def run(job: Ledgered, source: str, out: str, storage: StorageSettings, ray_settings: RaySettings, *,
        supersede: bool = False, threads: int = 8) -> LedgerRun:
    """Clean up → read the ledger → prune → pack what is left → Ray Data → sink → supersede → summary."""
    started = time.perf_counter()
    changed = remove_unmarked(out, storage, job.name) > 0
    ledger = Ledger(read(out, storage, job.name, threads), job.run_key)
    if job.prune(ledger):
        changed = True
        ledger = Ledger(read(out, storage, job.name, threads), job.run_key)
    todo = job.todo(ledger)
    summary = Summary(stage=job.name, source=source, out=out)
    for record in ledger.current:
        summary.add(record.stats)
    summary.shards_skipped = len(ledger.current)
    log.info("%s: %d units to do, %d shards already done", job.name, len(todo), summary.shards_skipped)
    result = LedgerRun(summary, ledger)
    if todo:
        stage, units, pools = job.shards(todo)
        for stats in execute(stage, [item(stage, unit) for unit in units], out, storage, ray_settings, pools=pools):
            summary.add(stats)
            result.written.append(ShardRecord.of(stats))
        summary.shards_written = len(result.written)
    if supersede and ledger.others:
        for record in ledger.others:
            remove_shard(out, storage, record.shard)
        summary.extra["shards_superseded"] = len(ledger.others)
        log.info("%s: removed %d shards of earlier models or settings", job.name, len(ledger.others))
    result.changed = changed or bool(ledger.others)
    summary.seconds = round(time.perf_counter() - started, 2)
    return result
