"""Annotate's reading of the executor's ledger: a unit is (relpath, size, segment, segments); a video is
covered when every segment of one segmentation is done; a file replaced in place has another size."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from typing import Callable, Mapping

import pyarrow as pa

from ferray.annotate.job import Job
from ferray.annotate.stage import annotation_stats
from ferray.data import io
from ferray.data.schema import MEDIA_VIDEO
from ferray.executor import ledger as ledgers
from ferray.executor.ledger import Ledger, ShardRecord, UnitKey

log = logging.getLogger(__name__)


class Coverage:
    """Which files the ledger's current shards cover: every unit done; for a video, every segment of
    some segmentation. Indexed once by (relpath, size), so a listing of millions is checked in one pass."""

    def __init__(self, ledger: Ledger) -> None:
        self._done: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
        for relpath, size, segment, segments in ledger.keys:
            self._done[(str(relpath), int(size))].add((int(segment), int(segments)))

    def __call__(self, file: io.TreeFile) -> bool:
        relpath = file.relpath if file.relpath is not None else io.printable(file.member)
        found = self._done.get((relpath, file.size))
        if not found:
            return False
        return any(all((k, total) in found for k in range(total)) for total in {total for _, total in found})


def replaced(listing: Mapping[str, int]) -> Callable[[UnitKey], bool]:
    """A unit whose file SOURCE now lists with another size (replaced in place)."""
    return lambda key: listing.get(str(key[0]), key[1]) != key[1]


def unit_relpath(name: str, media_type: str | None) -> str:
    return name.rsplit("@", 1)[0] if media_type == MEDIA_VIDEO else name


def prune_replaced(job: Job, record: ShardRecord, listing: Mapping[str, int]) -> None:
    """Drop the rows of files replaced in place (listed with another size) from a finished shard."""
    changed = replaced(listing)
    gone = {key[0] for key in record.units if changed(key)}
    keep = tuple(key for key in record.units if key[0] not in gone)
    if not keep:
        ledgers.remove_shard(job.out, job.storage, record.shard)
        return
    table = ledgers.read_rows(job.out, job.storage, record.shard)
    mask = [unit_relpath(u, m) not in gone for u, m in zip(table["unit"].to_pylist(), table["media_type"].to_pylist())]
    table = table.filter(pa.array(mask, pa.bool_()))
    counters = {"video_seconds": record.stats.get("extra", {}).get("video_seconds", 0.0)}
    stats = annotation_stats(record.shard, table, keep, job.run_key, job.model.version, counters)
    fingerprint = hashlib.sha256(f"{job.run_key}\n{json.dumps(keep)}".encode()).hexdigest()
    io.ShardSink(job.out, job.storage).write(record.shard, table, fingerprint, stats)
    log.info("annotate: %s: dropped the rows of %d files replaced since", record.shard, len(gone))
