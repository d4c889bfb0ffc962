"""Per-video summaries (`OUT/videos/`) and timelines (`OUT/timelines/`) of finished videos."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ferray.annotate import video
from ferray.annotate.job import Job
from ferray.annotate.ledger import Ledger, ShardRecord, read_shard_rows, unit_relpath
from ferray.annotate.media import media_type, output_path
from ferray.data import io
from ferray.data.schema import MEDIA_VIDEO

log = logging.getLogger(__name__)


VIDEOS = "videos"
TIMELINES = "timelines"


def _video_key(relpath: str, units: list[tuple[str, int, int, int]], run: str) -> str:
    return hashlib.sha256(json.dumps([run, sorted(units)]).encode()).hexdigest()


def write_video_summaries(job: Job, files: list[io.TreeFile], records: list[ShardRecord], threads: int) -> int:
    """A summary row (`OUT/videos/<path>.parquet`) and timeline (`OUT/timelines/<path>.png`) per finished video.

    A name too long to take the suffix is shortened (`output_path`).
    """
    where: dict[tuple[str, int], list[tuple[str, int, int, int]]] = defaultdict(list)
    shards_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        for key in record.units:
            relpath, size = key[0], key[1]
            if media_type(relpath) == MEDIA_VIDEO:
                where[(relpath, size)].append(key)
                shards_of[relpath].add(record.shard)
    ledger = Ledger(records, job.run_key)
    wanted = {}
    for file in files:
        if file.relpath and media_type(file.relpath) == MEDIA_VIDEO and ledger.covers(file):
            wanted[file.relpath] = (file, _video_key(file.relpath, where[(file.relpath, file.size)], job.run_key))

    def stale(item: tuple[str, tuple[io.TreeFile, str]]) -> bool:
        marker = io.join(job.out, VIDEOS, io.MARKERS, output_path(item[0], ".json"))
        return not io.exists(marker, job.storage) or io.read_json(marker, job.storage).get("fingerprint") != item[1][1]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        todo = [item for item, redo in zip(wanted.items(), pool.map(stale, wanted.items())) if redo]
    if not todo:
        return 0
    columns = ["unit", "source_path", "media_type", "frame_index", "timestamp_s", "face_index", "label", "confidence",
               "probs", "status"]
    needed = sorted({shard for relpath, _ in todo for shard in shards_of[relpath]})
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tables = list(pool.map(lambda s: read_shard_rows(job.out, job.storage, s, columns), needed))
    everything = pa.concat_tables(tables)
    rows = everything.filter(pc.equal(everything["media_type"], MEDIA_VIDEO))
    relpaths = np.array([unit_relpath(u, MEDIA_VIDEO) for u in rows["unit"].to_pylist()], dtype=object)
    for relpath, (file, fingerprint) in todo:
        mine = rows.filter(pa.array(relpaths == relpath, pa.bool_()))
        source_path = mine["source_path"][0].as_py() if mine.num_rows else relpath
        timeline = io.join(job.out, TIMELINES, output_path(relpath, ".png"))
        summary = video.summarize(source_path, job.model.version, mine, timeline)
        if summary["frames_sampled"]:
            io.write_bytes_atomic(timeline, video.timeline_png(relpath, mine), job.storage)
        io.write_parquet(video.summary_table(summary), io.join(job.out, VIDEOS, output_path(relpath, ".parquet")),
                         job.storage)
        io.write_json(io.join(job.out, VIDEOS, io.MARKERS, output_path(relpath, ".json")),
                      {"fingerprint": fingerprint}, job.storage)
    return len(todo)
