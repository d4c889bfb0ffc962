"""Per-video summaries (`OUT/videos/`), timelines (`OUT/timelines/`) and face tracks of finished videos."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ferray.annotate import tracks, video
from ferray.annotate.job import Job
from ferray.annotate.ledger import Coverage, unit_relpath
from ferray.executor.ledger import Ledger, ShardRecord, read_rows
from ferray.annotate.media import media_type, output_path
from ferray.config import AnnotateSettings
from ferray.data import io
from ferray.data.schema import MEDIA_VIDEO

log = logging.getLogger(__name__)


VIDEOS = "videos"
TIMELINES = "timelines"


def _video_key(relpath: str, units: list[tuple[str, int, int, int]], run: str, settings: AnnotateSettings) -> str:
    return hashlib.sha256(json.dumps([run, sorted(units), tracks.knobs(settings)], sort_keys=True).encode()).hexdigest()


def write_video_summaries(job: Job, files: list[io.TreeFile], records: list[ShardRecord], threads: int,
                          redo: frozenset[str] = frozenset()) -> int:
    """A summary row (`OUT/videos/<path>.parquet`) and timeline (`OUT/timelines/<path>.png`) per finished video,
    its tracks (`OUT/tracks/<path>.parquet`, and their columns in its shards); again for the videos in
    `redo` (a shard of theirs was written afresh, without track columns).

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
    covered = Coverage(Ledger(records, job.run_key))
    wanted = {}
    for file in files:
        if file.relpath and media_type(file.relpath) == MEDIA_VIDEO and covered(file):
            units = where[(file.relpath, file.size)]
            wanted[file.relpath] = (file, _video_key(file.relpath, units, job.run_key, job.settings))

    def stale(item: tuple[str, tuple[io.TreeFile, str]]) -> bool:
        marker = io.join(job.out, VIDEOS, io.MARKERS, output_path(item[0], ".json"))
        if item[0] in redo or not io.exists(marker, job.storage):
            return True
        return io.read_json(marker, job.storage).get("fingerprint") != item[1][1]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        todo = [item for item, again in zip(wanted.items(), pool.map(stale, wanted.items())) if again]
    if not todo:
        return 0
    columns = ["unit", "source_path", "media_type", *tracks.COLUMNS]
    needed = sorted({shard for relpath, _ in todo for shard in shards_of[relpath]})
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tables = list(pool.map(lambda s: read_rows(job.out, job.storage, s, columns), needed))
    everything = pa.concat_tables(tables)
    rows = everything.filter(pc.equal(everything["media_type"], MEDIA_VIDEO))
    relpaths = np.array([unit_relpath(u, MEDIA_VIDEO) for u in rows["unit"].to_pylist()], dtype=object)
    track_columns: list[pa.Table] = []
    for relpath, (file, fingerprint) in todo:
        mine = rows.filter(pa.array(relpaths == relpath, pa.bool_()))
        source_path = mine["source_path"][0].as_py() if mine.num_rows else relpath
        timeline = io.join(job.out, TIMELINES, output_path(relpath, ".png"))
        summary = video.summarize(source_path, job.model.version, mine, timeline)
        # Face tracks over the whole video (ferray.annotate.tracks): their summaries and timeline now, their
        # columns into the shards below, before any marker says the video is done.
        found = tracks.video_tracks(source_path, job.model.version, mine, job.settings)
        if summary["frames_sampled"]:
            io.write_bytes_atomic(timeline, video.timeline_png(relpath, mine, found), job.storage)
        summary.update(tracks.write_video(job.out, job.storage, relpath, found, summary["duration_s"]))
        track_columns.append(found.columns)
        io.write_parquet(video.summary_table(summary), io.join(job.out, VIDEOS, output_path(relpath, ".parquet")),
                         job.storage)
    tracks.fill_shards(job.out, job.storage, needed, pa.concat_tables(track_columns), threads)
    for relpath, (_, fingerprint) in todo:
        io.write_json(io.join(job.out, VIDEOS, io.MARKERS, output_path(relpath, ".json")),
                      {"fingerprint": fingerprint}, job.storage)
    return len(todo)
