"""`ferray annotate`: every face in every image and sampled video frame under SOURCE, labelled by MODEL."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from ferray.annotate import plan, stage
from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
from ferray.annotate.ledger import prune_replaced, replaced
from ferray.annotate.media import Unit, media_type
from ferray.annotate.overlays import write_overlays
from ferray.annotate.summaries import write_video_summaries
from ferray.config import RaySettings, Settings
from ferray.data import io
from ferray.executor import Pools, ShardUnit, Stage, Summary
from ferray.executor import ledger as ledgers
from ferray.executor.ledger import Ledger
from ferray.model import artifact

log = logging.getLogger(__name__)


@dataclass
class AnnotateRun:
    """Annotate as a ledgered stage of the executor: what is done, what changed, what is left."""

    job: Job
    tree: io.Tree
    files: list[io.TreeFile]
    ray_settings: RaySettings
    name: str = "annotate"

    @property
    def run_key(self) -> str:
        return self.job.run_key

    def prune(self, ledger: Ledger) -> int:
        listing = {f.relpath: f.size for f in self.files if f.relpath is not None}
        stale = ledger.holding(replaced(listing))
        for record in stale:
            prune_replaced(self.job, record, listing)
        return len(stale)

    def todo(self, ledger: Ledger) -> list[Unit]:
        return plan.plan_units(self.tree, self.files, ledger, self.job.settings)

    def shards(self, todo: list[Unit]) -> tuple[Stage, list[ShardUnit], Pools]:
        return stage.shards(self.job, todo, len(self.files), self.ray_settings)


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
    log.info("annotate: %d files (model %s)", len(files), ref.version)
    try:
        done = ledgers.run(AnnotateRun(job, tree, files, settings.ray), source, out, storage, settings.ray,
                           supersede=settings.annotate.supersede, threads=threads)
    finally:
        tree.close()
    summary = done.summary
    fresh = frozenset(key[0] for record in done.written for key in record.units)
    videos = write_video_summaries(job, files, done.finished, threads, fresh)
    summary.extra["video_summaries_written"] = videos
    if settings.annotate.overlays:  # last: every row is written and marked, every video summarised
        summary.extra.update(write_overlays(job, files, done.finished, fresh))
    _finish(summary, files)
    summary.seconds = round(time.perf_counter() - started, 2)
    if done.written or videos or done.changed:
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
