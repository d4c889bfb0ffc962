"""`ferray annotate`: every face in every image and sampled video frame under SOURCE, labelled by MODEL."""

from __future__ import annotations

import logging
import time
from collections import Counter

from ferray.annotate import plan
from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
from ferray.annotate.ledger import Ledger, ShardRecord, prune_replaced, read_ledger, remove_shard, remove_unmarked
from ferray.annotate.media import media_type
from ferray.annotate.overlays import write_overlays
from ferray.annotate.stage import execute
from ferray.annotate.summaries import write_video_summaries
from ferray.config import Settings
from ferray.data import io
from ferray.executor import Summary
from ferray.model import artifact

log = logging.getLogger(__name__)


def run(settings: Settings, model: str, source: str, out: str) -> Summary:
    """Annotate SOURCE into OUT with MODEL; inputs already annotated by the same model and settings are skipped."""
    started = time.perf_counter()
    storage = settings.storage
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    ref = with_lite(resolve_model(model, storage), settings.annotate, storage)
    faces = face_settings(settings.faces, ref)
    job = Job(source, out, storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    threads = settings.annotate.probe_threads

    tree = io.Tree(source, storage)
    files = plan.inputs(tree, out, storage)  # looked up on the module: tests wrap it
    changed = remove_unmarked(out, storage) > 0
    ledger = Ledger(read_ledger(out, storage, threads), job.run_key)
    replaced = ledger.stale({f.relpath: f.size for f in files if f.relpath is not None})
    for record in replaced:
        prune_replaced(job, record, {f.relpath: f.size for f in files if f.relpath is not None})
    if replaced:
        changed = True
        ledger = Ledger(read_ledger(out, storage, threads), job.run_key)
    units = plan.plan_units(tree, files, ledger, settings.annotate)
    tree.close()

    summary = Summary(stage="annotate", source=source, out=out)
    for record in ledger.current:
        summary.add(record.stats)
    summary.shards_skipped = len(ledger.current)
    log.info("annotate: %d files, %d units to do, %d shards already done (model %s)",
             len(files), len(units), summary.shards_skipped, ref.version)
    written: list[ShardRecord] = []
    if units:
        for stats in execute(job, units, len(files), settings.ray):
            summary.add(stats)
            written.append(ShardRecord(stats["shard"], job.run_key, tuple(tuple(u) for u in stats["units"]), stats))  # type: ignore[misc]
        summary.shards_written = len(written)
    if settings.annotate.supersede and ledger.others:
        for record in ledger.others:
            remove_shard(out, storage, record.shard)
        summary.extra["shards_superseded"] = len(ledger.others)
        log.info("annotate: removed %d shards of earlier models or settings", len(ledger.others))
    fresh = frozenset(key[0] for record in written for key in record.units)
    videos = write_video_summaries(job, files, ledger.current + written, threads, fresh)
    summary.extra["video_summaries_written"] = videos
    if settings.annotate.overlays:  # last: every row is written and marked, every video summarised
        summary.extra.update(write_overlays(job, files, ledger.current + written, fresh))
    _finish(summary, files)
    summary.seconds = round(time.perf_counter() - started, 2)
    if written or videos or changed or ledger.others:
        io.write_json(io.join(out, io.META, "annotate.json"),
                      {"model": model, "model_uri": artifact.public_uri(ref.uri), "model_version": ref.version, "run_key": job.run_key,
                       "summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
    return summary


def _finish(summary: Summary, files: list[io.TreeFile]) -> None:
    """Run-level figures for the one-screen report: inputs by kind, no-face rate, mean confidence."""
    kinds = Counter(media_type(f.relpath or f.member) or "other" for f in files)
    summary.extra.update({f"inputs_{kind}": count for kind, count in kinds.items()})
    frames, faces = summary.extra.get("frames", 0), summary.extra.get("faces", 0)
    confidence = summary.extra.pop("confidence_sum", 0.0)
    summary.extra["no_face_rate"] = round(summary.extra.get("no_face", 0) / frames, 4) if frames else 0
    summary.extra["mean_confidence"] = round(confidence / faces, 4) if faces else 0
    summary.extra["video_seconds"] = round(summary.extra.get("video_seconds", 0.0), 2)
