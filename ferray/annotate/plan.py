"""Planning on the driver: SOURCE's inputs, video probes, and the units still to do."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from ferray.annotate import video
from ferray.annotate.ledger import Coverage
from ferray.annotate.media import MediaError, Probe, Unit, file_unit, media_type, video_units
from ferray.config import AnnotateSettings, StorageSettings
from ferray.data import io
from ferray.data.schema import MEDIA_VIDEO
from ferray.executor.ledger import Ledger

log = logging.getLogger(__name__)


def probe_videos(tree: io.Tree, files: list[io.TreeFile], settings: AnnotateSettings) -> dict[str, Probe | MediaError]:
    """Frame count and rate of each new video; in threads for folders and prefixes (I/O bound)."""
    members = [f.member for f in files]
    if not members:
        return {}
    if tree.kind in ("zip", "tar"):  # one archive handle: not shareable across threads
        return {m: video.probe_member(tree, m, settings) for m in members}
    with ThreadPoolExecutor(max_workers=settings.probe_threads) as pool:
        return dict(zip(members, pool.map(lambda m: video.probe_member(tree, m, settings), members)))


def plan_units(tree: io.Tree, files: list[io.TreeFile], ledger: Ledger, settings: AnnotateSettings) -> list[Unit]:
    """Units of every file not fully annotated yet, minus segments already done, in path order."""
    covered = Coverage(ledger)
    todo = [f for f in files if not covered(f)]
    videos = [f for f in todo if f.relpath and media_type(f.relpath) == MEDIA_VIDEO and f.size > 0]
    probes = probe_videos(tree, videos, settings)
    units: list[Unit] = []
    for file in todo:
        if file.relpath and media_type(file.relpath) == MEDIA_VIDEO:
            units += video_units(file, probes.get(file.member), settings)
        else:
            units.append(file_unit(file))
    return sorted((u for u in units if not ledger.done(u.key)), key=lambda u: (u.relpath, u.segment))


def inputs(tree: io.Tree, out: str, storage: StorageSettings) -> list[io.TreeFile]:
    """SOURCE's files, less OUT when OUT lies inside SOURCE (its timelines are not photos to label)."""
    files = tree.files()
    if tree.kind != "dir":
        return files
    out_fs, out_path = io.url_to_fs(out, storage)
    if type(out_fs) is not type(tree.fs) or not out_path.startswith(tree.path.rstrip("/") + "/"):
        return files
    inside = out_path[len(tree.path.rstrip("/")) + 1 :].rstrip("/") + "/"
    kept = [f for f in files if not f.member.startswith(inside)]
    if len(kept) < len(files):
        log.info("annotate: OUT is inside SOURCE; its %d files are not inputs", len(files) - len(kept))
    return kept
