"""Videos with OpenCV, a frame at a time: captures on any tree member, probing, segments; per-video summaries."""

from __future__ import annotations

import contextlib
import io as pyio
import logging
import math
import os
import posixpath
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import cv2
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from ferray.annotate.media import MediaError, Probe, open_member, sampled_frames
from ferray.annotate.tracks import label_runs
from ferray.config import AnnotateSettings
from ferray.data import io
from ferray.data.schema import LABELS, STATUS_OK, VIDEO_SUMMARY_SCHEMA, status
from ferray.faces.align import NO_FACE

if TYPE_CHECKING:
    from ferray.annotate.tracks import VideoTracks

log = logging.getLogger(__name__)


class _Stream(pyio.BufferedIOBase):
    """OpenCV's stream input wants a BufferedIOBase; fsspec and archive handles are file-like enough."""

    def __init__(self, handle: BinaryIO) -> None:
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._handle.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._handle.seek(offset, whence)
        return self._handle.tell()

    def tell(self) -> int:
        return self._handle.tell()


def _local_path(tree: io.Tree, member: str) -> str | None:
    """The file itself when the tree is a local folder or file; OpenCV opens it in place."""
    if not isinstance(tree.fs, LocalFileSystem) or tree.kind not in ("dir", "file"):
        return None
    return tree.path if tree.kind == "file" else io.join(tree.path, member)


@contextlib.contextmanager
def _temp_copy(handle: BinaryIO, suffix: str, settings: AnnotateSettings) -> Iterator[str]:
    """A local copy written in chunks (never the whole video in memory), deleted afterwards."""
    fd, path = tempfile.mkstemp(prefix="ferray-video-", suffix=suffix, dir=settings.temp_dir)
    try:
        with os.fdopen(fd, "wb") as target:
            try:
                shutil.copyfileobj(handle, target, settings.copy_chunk_bytes)
            except (OSError, EOFError, ValueError) as error:  # the object or archive member broke mid-copy
                raise MediaError("read", "error", f"{type(error).__name__}: {error}"[:300]) from None
        yield path
    finally:
        os.unlink(path)


def _from_stream(stream: _Stream) -> cv2.VideoCapture | None:
    try:
        return cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
    except cv2.error:  # an OpenCV without stream input (before 4.11): the caller copies instead
        log.debug("this OpenCV cannot read video from a stream; copying to a temp file")
        return None


@contextlib.contextmanager
def capture(tree: io.Tree, member: str, settings: AnnotateSettings) -> Iterator[cv2.VideoCapture]:
    """An opened VideoCapture on a tree member: in place when local, else streamed or copied."""
    with contextlib.ExitStack() as stack:
        source = _local_path(tree, member)
        cap = None
        # OpenCV drops its reference to a stream while it holds no GIL: if that were the last
        # reference the interpreter would abort, so this frame keeps one until after release().
        stream: _Stream | None = None
        if source is None:
            handle = stack.enter_context(contextlib.closing(open_member(tree, member)))
            if settings.video_io == "stream":
                stream = _Stream(handle)
                cap = _from_stream(stream)
            if cap is None:
                source = stack.enter_context(_temp_copy(handle, posixpath.splitext(member)[1], settings))
        if cap is None:
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
        stack.callback(cap.release)
        if not cap.isOpened():
            raise MediaError("video", "unreadable", "OpenCV cannot open it (damaged, cut short, or an unknown codec)")
        yield cap
    del stream  # only now, after cap.release() ran on leaving the stack


def probe(cap: cv2.VideoCapture) -> Probe:
    """Frame count (0 when the container does not say) and rate of an opened capture."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError("video", "unreadable", "the container gives no frame rate")
    frames = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    return Probe(int(frames) if math.isfinite(frames) and frames > 0 else 0, float(fps))


def probe_member(tree: io.Tree, member: str, settings: AnnotateSettings) -> Probe | MediaError:
    try:
        with capture(tree, member, settings) as cap:
            return probe(cap)
    except MediaError as error:
        return error


class SegmentReader:
    """The sampled frames of [start, end) as (frame index, BGR array), decoded one at a time.

    `ended_early` tells that the file stopped before `end` (damaged or cut short after its header).
    """

    def __init__(self, cap: cv2.VideoCapture, start: int, end: int | None, step: float) -> None:
        self.cap, self.start, self.end, self.step = cap, start, end, step
        self.ended_early = False
        self.last_frame = start - 1  # the last frame yielded
        self.position = start  # frames decoded so far, from the file's start

    def _seek(self) -> int:
        if self.start == 0:
            return 0
        # FFmpeg seeks to the keyframe before and decodes forward, so the position is exact.
        self.cap.set(cv2.CAP_PROP_POS_FRAMES, self.start)
        position = int(round(self.cap.get(cv2.CAP_PROP_POS_FRAMES)))
        if position > self.start:
            raise MediaError("video", "seek_failed", f"seek to frame {self.start} landed on {position}")
        return position

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        self.position = self._seek()
        for target in sampled_frames(self.start, self.end, self.step):
            while self.position < target:
                if not self.cap.grab():  # grab decodes without converting: cheap for skipped frames
                    self.ended_early = self.end is not None
                    return
                self.position += 1
            ok, frame = self.cap.read()
            if not ok or frame is None:
                self.ended_early = self.end is not None
                return
            self.position += 1
            self.last_frame = target
            yield target, frame
        if self.end is not None:
            self.position = self.end  # the rest of the segment holds no sample; it counts as covered

    def seconds(self, fps: float) -> float:
        """Video time this segment covered."""
        return max(0, self.position - self.start) / fps


def cut_short(decoded: int, declared: int) -> bool:
    """Decoding a whole file stopped clearly before the frame count its container declares.

    Some containers only estimate the count (from duration × rate), so a frame or two, or 1%,
    of shortfall is normal; more means the file was cut mid-stream.
    """
    return declared > 0 and decoded < declared - max(2, declared // 100)


def to_pixels(frame: np.ndarray, color: str) -> np.ndarray:
    """An OpenCV BGR frame as the grey or RGB array the face pipeline takes."""
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if color == "gray" else cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- per-video summary


def summarize(source_path: str, model_version: str, rows: pa.Table, timeline: str | None) -> dict[str, Any]:
    """One summary row from every row of a video: share of sampled time per expression of its largest face."""
    table = rows.to_pydict()
    frames: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    confidences: list[float] = []
    for index, row_status in enumerate(table["status"]):
        frame = table["frame_index"][index]
        if row_status not in (STATUS_OK, NO_FACE) or frame is None:
            errors.append(row_status)
            continue
        entry = frames.setdefault(frame, {"t": table["timestamp_s"][index], "faces": 0, "label": None})
        if row_status == STATUS_OK:
            entry["faces"] += 1
            confidences.append(table["confidence"][index])
            if table["face_index"][index] == 0:
                entry["label"] = table["label"][index]
    sampled = len(frames)
    counts = np.zeros(len(LABELS))
    for entry in frames.values():
        if entry["label"] is not None:
            counts[entry["label"]] += 1
    with_face = int(sum(1 for entry in frames.values() if entry["faces"]))
    times = sorted(entry["t"] for entry in frames.values())
    interval = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    dominant = int(counts.argmax()) if with_face else None
    row: dict[str, Any] = {
        "source_path": source_path,
        "model_version": model_version,
        "status": STATUS_OK if sampled else (errors[0] if errors else status("video", "no_frames")),
        "frames_sampled": sampled,
        "frames_with_face": with_face,
        "duration_s": (times[-1] + interval) if times else 0.0,
        "faces_per_frame": float(np.mean([e["faces"] for e in frames.values()])) if sampled else 0.0,
        "max_faces_per_frame": max((e["faces"] for e in frames.values()), default=0),
        "share_no_face": (sampled - with_face) / sampled if sampled else None,
        "dominant_label": dominant,
        "dominant_label_name": LABELS[dominant] if dominant is not None else None,
        "mean_confidence": float(np.mean(confidences)) if confidences else None,
        "error_rows": len(errors),
        "timeline": timeline if sampled else None,
    }
    for label, name in enumerate(LABELS):
        row[f"share_{name}"] = counts[label] / sampled if sampled else None
    return row


def summary_table(row: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist([row], schema=VIDEO_SUMMARY_SCHEMA)


def _no_face_spans(sampled: list[float], faces: set[float], step: float) -> list[tuple[float, float]]:
    """(start, length) of the runs of sampled frames without a face, each sample standing for one step."""
    spans: list[tuple[float, float]] = []
    for t in sampled:
        if t in faces:
            continue
        if spans and abs(spans[-1][0] + spans[-1][1] - t) < step / 2:
            spans[-1] = (spans[-1][0], spans[-1][1] + step)
        else:
            spans.append((t, step))
    return spans


def timeline_png(title: str, rows: pa.Table, found: VideoTracks | None = None) -> bytes:
    """A video at a glance (matplotlib): above, one lane per face track (`found`, a tracks.VideoTracks)
    coloured by its label at each sample; below, the class probabilities of the largest face over time;
    grey where a sampled frame had no face. Without tracks the one lane is the largest face's label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ferray.evaluate.report import CLASS_COLORS

    table = rows.to_pydict()
    points = sorted(
        (table["timestamp_s"][i], table["probs"][i])
        for i, row_status in enumerate(table["status"])
        if row_status == STATUS_OK and table["face_index"][i] == 0 and table["timestamp_s"][i] is not None
    )
    sampled = sorted({t for t, s in zip(table["timestamp_s"], table["status"]) if t is not None and s in (STATUS_OK, NO_FACE)})
    step = float(np.median(np.diff(sampled))) if len(sampled) > 1 else 1.0
    end = (sampled[-1] if sampled else 0.0) + step  # the last sample stands for one step of time
    faces = dict(points)
    if found is not None and found.count:
        shown = found.labels if found.smoothed is None else found.smoothed
        lanes = [(f"track {s['track_id']}", found.times[found.track_ids == s["track_id"]],
                  shown[found.track_ids == s["track_id"]]) for s in found.summaries]
    else:
        lanes = [("largest face", np.array([t for t, _ in points]),
                  np.array([int(np.argmax(p)) for _, p in points], np.int64))]
    height = 3.2 + 0.3 * len(lanes)
    figure = Figure(figsize=(10, height))
    FigureCanvasAgg(figure)
    band_h = 0.3 * len(lanes) + 0.35
    # A fixed layout (no tight bounding box: that draws the figure twice).
    axes_band, axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [band_h, 2.2], "hspace": 0.08})
    figure.subplots_adjust(left=0.1, right=0.84, bottom=0.5 / height, top=1 - 0.45 / height)
    gaps = _no_face_spans(sampled, set(faces), step)
    for lane, (_, times, labels) in enumerate(lanes):
        y = len(lanes) - 1 - lane
        for label, bars in label_runs(times, labels, step).items():
            axes_band.broken_barh(bars, (y - 0.4, 0.8), facecolors=CLASS_COLORS[label], edgecolor="none")
        axes_band.broken_barh(gaps, (y - 0.4, 0.8), facecolors="#e0e0e0", edgecolor="none")
    axes_band.set_yticks(range(len(lanes)), [name for name, _, _ in reversed(lanes)], fontsize=8)
    axes_band.set_ylim(-0.6, len(lanes) - 0.4)
    axes_band.tick_params(axis="x", bottom=False)
    kind = f", labels smoothed over {found.window:g} s" if found is not None and found.smoothed is not None else ""
    axes_band.set_title(f"{title[-80:]}: {len(sampled)} sampled frames{kind}", fontsize=9)
    for label, colour in enumerate(CLASS_COLORS):
        run: list[tuple[float, float]] = []
        for t in sampled + [math.inf]:  # a frame without a face breaks the line
            probs = faces.get(t)
            if probs is None:
                if run:
                    xs, ys = zip(*run)
                    axes.plot(xs, ys, color=colour, linewidth=1.8, marker="o" if len(run) == 1 else None, markersize=3)
                run = []
            else:
                run.append((t + step / 2, float(probs[label])))  # drawn mid-sample, like the bars above
    for start, length in gaps:
        axes.axvspan(start, start + length, color="#f0f0f0", zorder=0)
    axes.set_ylim(0, 1)
    axes.set_xlim(0, end)
    axes.set_ylabel("largest face: p(class)", fontsize=8)
    axes.set_xlabel("seconds", fontsize=8)
    axes.grid(axis="y", color="#e6e6e6", linewidth=0.8)
    axes.tick_params(labelsize=8)
    handles = [Patch(color=c, label=name) for name, c in zip(LABELS, CLASS_COLORS)] + [Patch(color="#e0e0e0", label="no face")]
    axes_band.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    buffer = pyio.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()
