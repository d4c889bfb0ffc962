"""What annotation does with a SOURCE listing: media kinds, work units, frame sampling, packing into shards."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterator

from ferray.config import AnnotateSettings
from ferray.data import io
from ferray.data.schema import MEDIA_IMAGE, MEDIA_VIDEO, STATUS_OK, status
from ferray.executor.ledger import shard_name

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm"})
UNSUPPORTED = status("media", "unsupported")
UNSAFE = status("media", "unsafe_path")
EMPTY_VIDEO = status("video", "empty")
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
    except io.READ_ERRORS as error:
        raise MediaError("read", *io.read_failure(error)) from None


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
    return shard_name(fingerprint), fingerprint
