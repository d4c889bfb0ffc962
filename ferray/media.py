"""What annotation does with a SOURCE listing: media kinds, work units, frame sampling, shards, the done ledger."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Iterator, Mapping

from ferray import io
from ferray.config import AnnotateSettings, StorageSettings
from ferray.schema import MEDIA_IMAGE, MEDIA_VIDEO, STATUS_OK, status
from ferray.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm"})
UNSUPPORTED = status("media", "unsupported")
UNSAFE = status("media", "unsafe_path")
EMPTY_VIDEO = status("video", "empty")
# Shard names are content hashes; only names of this shape are ever cleaned up or superseded.
SHARD_NAME = re.compile(r"^part-[0-9a-f]{16}$")

UnitKey = tuple[str, int, int, int]  # relpath, size, segment, segments


class MediaError(ValueError):
    """A named, expected failure of one unit (`read:missing`, `video:unreadable` …)."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status(stage, reason)


def media_type(name: str) -> str | None:
    """`image` or `video` by file extension; None for anything else."""
    ext = posixpath.splitext(name.lower())[1]
    return MEDIA_IMAGE if ext in IMAGE_EXTENSIONS else MEDIA_VIDEO if ext in VIDEO_EXTENSIONS else None


def open_member(tree: io.Tree, member: str) -> BinaryIO:
    """A seekable binary handle on one member of a tree, read lazily (never the whole file)."""
    try:
        return tree.open(member)
    except FileNotFoundError:
        raise MediaError("read", "missing", "listed but gone when read") from None
    except (OSError, EOFError, KeyError, ValueError) as error:  # unreadable object, corrupt archive member
        raise MediaError("read", "error", f"{type(error).__name__}: {error}"[:300]) from None


# Longest file name most local file systems accept (NAME_MAX, in bytes).
NAME_MAX = 255


def output_path(relpath: str, suffix: str) -> str:
    """`relpath + suffix` for a per-input output file, its last part shortened to fit NAME_MAX.

    An input may already use the whole name length (`<250 bytes>.mp4`); its summary `….mp4.parquet`
    would then not fit. Such names keep a readable prefix and a hash of the whole name, so that two
    long names never share an output; S3 gets the same names, so both layouts match.
    """
    folder, _, name = relpath.rpartition("/")
    wanted = name + suffix
    if len(wanted.encode()) <= NAME_MAX:
        return relpath + suffix
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    room = NAME_MAX - len(f"~{digest}{suffix}".encode())
    prefix = name.encode()[:room].decode("utf-8", "ignore")  # never cut a character in half
    short = f"{prefix}~{digest}{suffix}"
    return f"{folder}/{short}" if folder else short


# --------------------------------------------------------------------------- frame sampling


@dataclass(frozen=True)
class Probe:
    """What a video's container says: frame count (0 = unknown) and frames per second."""

    frames: int
    fps: float


def sample_step(video_fps: float, settings: AnnotateSettings) -> float:
    """Frames between samples: every Nth frame, or the video's rate over the wanted rate (at least 1)."""
    if settings.every_nth is not None:
        return float(settings.every_nth)
    return max(1.0, video_fps / settings.fps)


def sampled_frames(start: int, end: int | None, step: float) -> Iterator[int]:
    """Frame indices k·step (rounded) inside [start, end), in order; the same set whichever segment asks.

    Sampling on one global grid means segments neither drop nor repeat a sample at their edges.
    """
    k = max(0, math.floor((start - 0.5) / step))
    last = -1
    while True:
        frame = math.floor(k * step + 0.5)
        k += 1
        if frame < start or frame == last:
            continue
        if end is not None and frame >= end:
            return
        last = frame
        yield frame


# --------------------------------------------------------------------------- work units


@dataclass(frozen=True, slots=True)
class Unit:
    """One piece of work: an image, a video segment [start, end) in frames, or a file to report."""

    relpath: str  # path inside SOURCE: ids and the ledger derive from it, wherever SOURCE lives
    member: str | None  # tree member to read; None when there is nothing to read
    size: int
    media: str | None  # image | video | None (not media)
    segment: int = 0
    segments: int = 1
    start: int = 0
    end: int | None = None  # None: to the end of the file
    cost: int = 1  # frames it will sample, for packing shards
    status: str = STATUS_OK  # decided at listing (media:unsupported …); the worker only reports it
    error: str | None = None

    @property
    def key(self) -> UnitKey:
        return (self.relpath, self.size, self.segment, self.segments)

    @property
    def name(self) -> str:
        return f"{self.relpath}@{self.segment}/{self.segments}" if self.media == MEDIA_VIDEO else self.relpath


def file_unit(file: io.TreeFile) -> Unit:
    """The single unit of an image or of a file that is not media (reported, never dropped)."""
    if file.relpath is None:
        return Unit(io.printable(file.member), None, file.size, None, status=UNSAFE, error="member path escapes the source root")
    kind = media_type(file.relpath)
    if kind is None:
        ext = posixpath.splitext(file.relpath)[1] or "(none)"
        return Unit(file.relpath, file.member, file.size, None, status=UNSUPPORTED, error=f"unsupported extension {ext}")
    return Unit(file.relpath, file.member, file.size, kind)


def video_units(file: io.TreeFile, probe: Probe | MediaError | None, settings: AnnotateSettings) -> list[Unit]:
    """A video cut into segments of `segment_seconds`; the last one runs to the end of the file.

    Without a usable probe the video is one open-ended unit: a content failure (`video:unreadable`)
    is reported as is, an I/O failure is retried by the worker.
    """
    assert file.relpath is not None
    base = Unit(file.relpath, file.member, file.size, MEDIA_VIDEO, cost=settings.shard_frames)
    if file.size == 0:
        return [replace(base, status=EMPTY_VIDEO, error="zero-byte file", cost=1)]
    if isinstance(probe, MediaError):
        if probe.status.startswith("read:"):
            return [base]
        return [replace(base, status=probe.status, error=str(probe), cost=1)]
    if probe is None or probe.frames <= 0:
        return [base]
    step = sample_step(probe.fps, settings)
    per_segment = max(1, round(settings.segment_seconds * probe.fps))
    count = math.ceil(probe.frames / per_segment)
    units = []
    for index in range(count):
        start = index * per_segment
        end = None if index == count - 1 else start + per_segment
        frames = min(per_segment, probe.frames - start)
        units.append(Unit(file.relpath, file.member, file.size, MEDIA_VIDEO, index, count, start, end,
                          cost=max(1, math.ceil(frames / step))))
    return units


def pack(units: list[Unit], settings: AnnotateSettings) -> list[list[Unit]]:
    """Greedy shards over units in order, by count and by frames.

    Each shard depends only on where it starts, so when a crash leaves some shards unfinished the
    rerun, packing the units still to do, cuts exactly those shards again (same names, overwritten).
    """
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    frames = 0
    for unit in units:
        if current and (len(current) >= settings.shard_units or frames + unit.cost > settings.shard_frames):
            shards.append(current)
            current, frames = [], 0
        current.append(unit)
        frames += unit.cost
    if current:
        shards.append(current)
    return shards


def for_actors(listed: int, settings: AnnotateSettings, actors: int) -> AnnotateSettings:
    """Shard limits that give each of `actors` about `shards_per_actor` shards of a small SOURCE.

    A large SOURCE keeps shard_units and shard_frames; a small one (a few hundred images, a few
    videos) would otherwise fill one or two shards and leave CPUs idle, or one CPU working alone at
    the end. The limits follow the number of files SOURCE lists, not of units still to do, so a
    rerun over the same listing cuts the same shards (`pack`).
    """
    want = max(1, actors * settings.shards_per_actor)
    units = min(settings.shard_units, max(1, math.ceil(listed / want)))
    frames = min(settings.shard_frames, max(1, math.ceil(settings.shard_frames * units / settings.shard_units)))
    return settings.model_copy(update={"shard_units": units, "shard_frames": frames})


def shard_identity(run_key: str, units: list[Unit]) -> tuple[str, str]:
    """(name, fingerprint) of a shard: a hash of the run key and its units."""
    digest = hashlib.sha256(run_key.encode())
    digest.update(json.dumps([unit.key for unit in units]).encode())
    fingerprint = digest.hexdigest()
    return f"part-{fingerprint[:16]}", fingerprint


# --------------------------------------------------------------------------- the ledger of finished shards


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
