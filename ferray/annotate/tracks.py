"""Face tracks of a video: faces linked across sampled frames, smoothed labels, per-track summaries.

Everything here runs once a video's segments are all annotated, over its rows as written (boxes,
times, probabilities): linking needs no pixels, so the result depends only on the rows and is the
same however the video was cut into segments, on a rerun or on a resumed run (docs/tracking.md).
"""

from __future__ import annotations

import io as stdio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.optimize import linear_sum_assignment

from ferray.config import AnnotateSettings, StorageSettings
from ferray.data import io
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, STATUS_OK, TRACK_FIELDS, TRACK_SUMMARY_SCHEMA
from ferray.faces.align import NO_FACE

log = logging.getLogger(__name__)

TRACKS = "tracks"  # OUT/tracks/<video>.parquet: one row per track
# A face's width changes at most this much between two samples of its track (a cut to a close-up
# is another person as far as boxes can tell).
MAX_GROWTH = 2.0
_FAR = 1e9  # the cost of a pair outside the gate
TRACK_NAMES = frozenset(f.name for f in TRACK_FIELDS)
# The columns of a video's rows that tracking reads.
COLUMNS = ("id", "frame_index", "timestamp_s", "face_index", "bbox", "label", "confidence", "probs", "status")


# --------------------------------------------------------------------------- linking


@dataclass
class _Track:
    """A live track: where its face was last seen, and how fast it moved (px per second)."""

    id: int
    t: float
    centre: np.ndarray
    width: float
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))
    hits: int = 1

    def predicted(self, t: float) -> np.ndarray:
        return self.centre + self.velocity * (t - self.t)

    def update(self, t: float, centre: np.ndarray, width: float) -> None:
        dt = t - self.t
        if dt > 0:
            seen = (centre - self.centre) / dt
            self.velocity = seen if self.hits == 1 else 0.5 * self.velocity + 0.5 * seen
        self.t, self.centre, self.width, self.hits = t, centre, width, self.hits + 1


def _costs(tracks: list[_Track], centres: np.ndarray, widths: np.ndarray, t: float, max_shift: float) -> np.ndarray:
    """Track × face: centre distance from the prediction in track face widths, plus the log width ratio;
    `_FAR` outside the gate (over `max_shift` widths away, or width changed over MAX_GROWTH)."""
    predicted = np.stack([track.predicted(t) for track in tracks])
    width = np.array([track.width for track in tracks])
    shift = np.linalg.norm(predicted[:, None, :] - centres[None, :, :], axis=2) / width[:, None]
    growth = np.abs(np.log(widths[None, :] / width[:, None]))
    cost = shift + growth
    cost[(shift > max_shift) | (growth > math.log(MAX_GROWTH))] = _FAR
    return cost


def link(frames: np.ndarray, times: np.ndarray, boxes: np.ndarray, *, max_gap_s: float = 2.0,
         max_shift: float = 1.0) -> np.ndarray:
    """A track id per face row (0, 1, … in order of first appearance), from boxes alone.

    Rows are faces: `frames` groups them by sampled frame, `times` (seconds) orders the frames, `boxes`
    are (x, y, w, h). Within a frame, rows keep their given order (face_index: largest first) when new
    tracks start. Each frame's faces are assigned to the live tracks by minimum total cost
    (`_costs`, scipy's linear_sum_assignment) against each track's position predicted from its
    velocity; a face left over starts a track; a track unseen for more than `max_gap_s` ends.
    """
    frames = np.asarray(frames, np.int64)
    n = len(frames)
    ids = np.full(n, -1, np.int32)
    if n == 0:
        return ids
    times = np.asarray(times, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(n, 4)
    widths = np.maximum(boxes[:, 2], 1.0)
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    order = np.lexsort((np.arange(n), frames, times))
    cuts = np.flatnonzero(np.diff(frames[order])) + 1
    live: list[_Track] = []
    count = 0
    for rows in np.split(order, cuts):
        t = float(times[rows[0]])
        live = [track for track in live if t - track.t <= max_gap_s]
        pairs: list[tuple[int, int]] = []
        if live:
            cost = _costs(live, centres[rows], widths[rows], t, max_shift)
            pairs = [(a, b) for a, b in zip(*linear_sum_assignment(cost)) if cost[a, b] < _FAR]
        taken = set()
        for a, b in pairs:
            live[a].update(t, centres[rows[b]], widths[rows[b]])
            ids[rows[b]] = live[a].id
            taken.add(b)
        for b, row in enumerate(rows):
            if b not in taken:
                live.append(_Track(count, t, centres[row], widths[row]))
                ids[row] = count
                count += 1
    return ids


# --------------------------------------------------------------------------- smoothing


def smooth(track_ids: np.ndarray, times: np.ndarray, probs: np.ndarray, window_s: float) -> np.ndarray:
    """Each row's probabilities averaged over its track's rows within ±window_s/2 of it (a centred
    moving mean: no lag, and the same whichever order rows come in)."""
    probs = np.asarray(probs, np.float64)
    out = probs.copy()
    if window_s <= 0 or len(probs) == 0:
        return out
    track_ids, times = np.asarray(track_ids), np.asarray(times, np.float64)
    order = np.lexsort((times, track_ids))
    half = window_s / 2 + 1e-9  # a sample exactly half a window away is inside
    for rows in np.split(order, np.flatnonzero(np.diff(track_ids[order])) + 1):
        t = times[rows]
        summed = np.vstack([np.zeros(probs.shape[1]), np.cumsum(probs[rows], axis=0)])
        low, high = np.searchsorted(t, t - half, "left"), np.searchsorted(t, t + half, "right")
        out[rows] = (summed[high] - summed[low]) / (high - low)[:, None]
    return out


# --------------------------------------------------------------------------- per-track summaries


def summarize(source_path: str, model_version: str, track_ids: np.ndarray, times: np.ndarray, boxes: np.ndarray,
              labels: np.ndarray, confidences: np.ndarray, sampled: np.ndarray, smoothing_s: float) -> list[dict[str, Any]]:
    """One row per track (TRACK_SUMMARY_SCHEMA): first and last seen, seconds on screen (last − first +
    one sampling interval, so gaps the track bridged count), frames seen and missed in between, and
    the share of its seen frames in each expression of `labels`.

    `sampled` holds the timestamps of every sampled frame of the video (with a face or not).
    """
    sampled = np.unique(np.asarray(sampled, np.float64))
    interval = float(np.median(np.diff(sampled))) if len(sampled) > 1 else 0.0
    out = []
    for track in np.unique(track_ids):
        rows = np.flatnonzero(track_ids == track)
        t = times[rows]
        first, last = float(t.min()), float(t.max())
        between = int(np.searchsorted(sampled, last + 1e-9, "right") - np.searchsorted(sampled, first - 1e-9, "left"))
        counts = np.bincount(labels[rows], minlength=len(LABELS))
        dominant = int(counts.argmax())
        row: dict[str, Any] = {
            "source_path": source_path,
            "model_version": model_version,
            "track_id": int(track),
            "first_seen_s": first,
            "last_seen_s": last,
            "seconds_on_screen": last - first + interval,
            "frames_seen": len(rows),
            "frames_missed": max(0, between - len(np.unique(t))),
            "mean_bbox": [int(round(v)) for v in boxes[rows].mean(axis=0)],
            "dominant_label": dominant,
            "dominant_label_name": LABELS[dominant],
            "mean_confidence": float(np.mean(confidences[rows])),
            "smoothing_s": float(smoothing_s),
        }
        for label, name in enumerate(LABELS):
            row[f"share_{name}"] = float(counts[label] / len(rows))
        out.append(row)
    return out


# --------------------------------------------------------------------------- a video's rows → its tracks


@dataclass(frozen=True)
class VideoTracks:
    """A video's tracks: the columns its face rows get (`id` + TRACK_FIELDS) and one summary per track."""

    columns: pa.Table
    summaries: list[dict[str, Any]]
    # For the timeline: per face row, its track, time, raw and smoothed label.
    track_ids: np.ndarray
    times: np.ndarray
    labels: np.ndarray
    smoothed: np.ndarray | None
    interval: float
    window: float

    @property
    def count(self) -> int:
        return len(self.summaries)

    def summary_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.summaries, schema=TRACK_SUMMARY_SCHEMA)


def video_tracks(source_path: str, model_version: str, rows: pa.Table, settings: AnnotateSettings) -> VideoTracks:
    """Link, smooth and summarise every face row of one video (`rows`: all its rows, any order, COLUMNS)."""
    framed = pc.and_(pc.is_in(rows["status"], pa.array([STATUS_OK, NO_FACE])), pc.is_valid(rows["timestamp_s"]))
    sampled = rows["timestamp_s"].filter(framed).to_numpy()  # every sampled frame, with a face or not
    faces = rows.filter(pc.and_(pc.equal(rows["status"], STATUS_OK), pc.is_valid(rows["frame_index"])))
    faces = faces.sort_by([("frame_index", "ascending"), ("face_index", "ascending")])
    n = faces.num_rows
    frames = faces["frame_index"].to_numpy()
    times = faces["timestamp_s"].to_numpy()
    boxes = np.array(faces["bbox"].to_pylist(), np.float64).reshape(n, 4)
    labels = faces["label"].to_numpy().astype(np.int64)
    confidences = faces["confidence"].to_numpy().astype(np.float64)
    probs = np.array(faces["probs"].to_pylist(), np.float64).reshape(n, len(LABELS))
    ids = link(frames, times, boxes, max_gap_s=settings.track_gap_seconds, max_shift=settings.track_max_shift)
    window = settings.smooth_seconds
    types = {f.name: f.type for f in TRACK_FIELDS}
    columns: dict[str, pa.Array] = {"id": faces["id"].combine_chunks(), "track_id": pa.array(ids, types["track_id"])}
    smoothed_labels = None
    if window > 0:
        smoothed = smooth(ids, times, probs, window)
        smoothed_labels = smoothed.argmax(axis=1)
        flat = pa.array(smoothed.astype(np.float32).ravel(), pa.float32())
        columns["smoothed_probs"] = pa.FixedSizeListArray.from_arrays(flat, len(LABELS))
        columns["smoothed_label"] = pa.array(smoothed_labels, types["smoothed_label"])
        columns["smoothed_label_name"] = pa.array([LABELS[k] for k in smoothed_labels], pa.string())
    else:
        for name in ("smoothed_probs", "smoothed_label", "smoothed_label_name"):
            columns[name] = pa.nulls(n, types[name])
    table = pa.table(columns, schema=pa.schema([pa.field("id", pa.string()), *TRACK_FIELDS]))
    summaries = summarize(source_path, model_version, ids, times, boxes,
                          labels if smoothed_labels is None else smoothed_labels, confidences, sampled, window)
    unique = np.unique(sampled)
    interval = float(np.median(np.diff(unique))) if len(unique) > 1 else 0.0
    return VideoTracks(table, summaries, ids, times, labels, smoothed_labels, interval, window)


# --------------------------------------------------------------------------- the shards' track columns


def fill(table: pa.Table, columns: pa.Table) -> pa.Table | None:
    """`table` (a shard's rows) with the track columns of the rows `columns` names (by id); None when it
    names none. Other rows keep theirs; a shard written before these columns existed gets them."""
    where = {row_id: k for k, row_id in enumerate(columns["id"].to_pylist())}
    hits = np.array([where.get(row_id, -1) for row_id in table["id"].to_pylist()], np.int64)
    found = hits >= 0
    if not found.any():
        return None
    mask, take = pa.array(found), pa.array(np.where(found, hits, 0))
    out = {}
    for f in ANNOTATION_SCHEMA:
        old = table[f.name].combine_chunks() if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        out[f.name] = pc.if_else(mask, columns[f.name].take(take), old) if f.name in TRACK_NAMES else old
    return pa.table(out, schema=ANNOTATION_SCHEMA)


def fill_shards(out: str, storage: StorageSettings, shards: list[str], columns: pa.Table, threads: int) -> int:
    """Rewrite (atomically) each shard's data file holding rows that `columns` names; how many were."""
    if not columns.num_rows:
        return 0
    sink = io.ShardSink(out, storage)

    def one(shard: str) -> bool:
        uri = sink.data_uri(shard)
        table = fill(io.read_parquet(uri, storage), columns)
        if table is None:
            return False
        io.write_parquet(table, uri, storage)
        return True

    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = sum(pool.map(one, shards))
    log.info("annotate: track columns written into %d shards", done)
    return done


# --------------------------------------------------------------------------- the timeline


def label_runs(times: np.ndarray, labels: np.ndarray, step: float) -> dict[int, list[tuple[float, float]]]:
    """Label → (start, length) bars: one bar per run of samples with one label (a long video is a few
    hundred bars, not one per sample); a gap of more than one step between samples stays empty."""
    order = np.argsort(times, kind="stable")
    times, labels = np.asarray(times, np.float64)[order], np.asarray(labels)[order]
    bars: dict[int, list[tuple[float, float]]] = {}
    start = 0
    for k in range(1, len(times) + 1):
        if k == len(times) or labels[k] != labels[start] or times[k] - times[k - 1] > step * 1.5:
            bars.setdefault(int(labels[start]), []).append((float(times[start]), float(times[k - 1] - times[start] + step)))
            start = k
    return bars


def timeline_png(title: str, tracks: VideoTracks, duration: float | None = None) -> bytes:
    """One lane per track over the video's time: a bar coloured by its label at each sample (smoothed
    when smoothing is on, with the raw label as a thin strip beneath); white where the track was unseen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ferray.evaluate.report import CLASS_COLORS

    lanes = max(1, tracks.count)
    step = tracks.interval or 1.0
    end = duration if duration else (float(tracks.times.max()) + step if len(tracks.times) else step)
    height = 1.3 + 0.5 * lanes
    figure = Figure(figsize=(10, height))
    FigureCanvasAgg(figure)
    # A fixed layout (no tight bounding box: that draws the figure twice).
    figure.subplots_adjust(left=0.15, right=0.86, bottom=0.55 / height, top=1 - 0.4 / height)
    axes = figure.add_subplot()
    shown = tracks.labels if tracks.smoothed is None else tracks.smoothed
    for lane, summary in enumerate(tracks.summaries):
        rows = np.flatnonzero(tracks.track_ids == summary["track_id"])
        rows = rows[np.argsort(tracks.times[rows], kind="stable")]
        y = lanes - 1 - lane
        strips = [(shown, y - 0.22, 0.5)] + ([(tracks.labels, y - 0.36, 0.1)] if tracks.smoothed is not None else [])
        for labels, low, thick in strips:
            for label, bars in label_runs(tracks.times[rows], labels[rows], step).items():
                axes.broken_barh(bars, (low, thick), facecolors=CLASS_COLORS[label], edgecolor="none")
    axes.set_yticks(range(lanes), [f"track {s['track_id']}: {s['seconds_on_screen']:.1f} s, {s['dominant_label_name']}"
                                   for s in reversed(tracks.summaries)] or [""], fontsize=8)
    axes.set_ylim(-0.6, lanes - 0.4)
    axes.set_xlim(0, end)
    axes.set_xlabel("seconds", fontsize=8)
    kind = f"labels smoothed over {tracks.window:g} s; thin strip: raw" if tracks.smoothed is not None else "raw labels"
    axes.set_title(f"{title[-70:]}: {tracks.count} tracks ({kind})", fontsize=9)
    axes.legend(handles=[Patch(color=c, label=name) for name, c in zip(LABELS, CLASS_COLORS)], loc="upper left",
                bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- a video's track outputs


# Bumped when linking, smoothing or the summaries change, so that finished videos get the pass again.
VERSION = 1


def knobs(settings: AnnotateSettings) -> dict[str, Any]:
    """What a video's tracks depend on beyond its rows: part of its summary's fingerprint."""
    return {"version": VERSION, "gap": settings.track_gap_seconds, "shift": settings.track_max_shift,
            "smooth": settings.smooth_seconds}


def write_video(out: str, storage: StorageSettings, relpath: str, found: VideoTracks, duration: float) -> dict[str, Any]:
    """`OUT/tracks/<video>.parquet` (a row per track) and `OUT/timelines/<video>.tracks.png`; the
    video summary's `tracks` and `tracks_timeline`."""
    from ferray.annotate.media import output_path

    timeline = io.join(out, "timelines", output_path(relpath, ".tracks.png")) if found.count else None
    if timeline is not None:
        io.write_bytes_atomic(timeline, timeline_png(relpath, found, duration), storage)
    io.write_parquet(found.summary_table(), io.join(out, TRACKS, output_path(relpath, ".parquet")), storage)
    return {"tracks": found.count, "tracks_timeline": timeline}
