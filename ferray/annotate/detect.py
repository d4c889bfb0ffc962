"""Detection: decode images and sampled video frames, align every face (grouped), draft rows with raw chips."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ferray.annotate import video
from ferray.annotate.job import Job
from ferray.annotate.media import MediaError, Unit, sample_step
from ferray.data import io
from ferray.data.images import DecodeError, decode
from ferray.data.schema import TRACK_FIELDS, ANNOTATION_SCHEMA, MEDIA_IMAGE, STATUS_OK, status
from ferray.faces.align import NO_FACE, TOO_SMALL, AlignResult, align_images, too_small
from ferray.faces.detect import load_detector
from ferray.faces.landmarks import load_predictor

log = logging.getLogger(__name__)


# What detection hands to classification: the annotation columns known so far, plus the raw chip.
DRAFT_SCHEMA = pa.schema(
    [f for f in ANNOTATION_SCHEMA
     if f.name not in ("label", "label_name", "confidence", "probs", "model_version") and f not in TRACK_FIELDS]
    + [pa.field("chip", pa.binary())]
)


def row_id(path: str, frame: int | None, face: int | None) -> str:
    """Stable across reruns and SOURCE locations: the file's path inside SOURCE, frame and face."""
    text = f"{path}|{'-' if frame is None else frame}|{'-' if face is None else face}"
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


# A group of frames waiting for alignment holds at most this many pixels (16 1080p grey frames; one 12 MP photo).
GROUP_PIXELS = 33_000_000


@dataclass
class _Pending:
    """A decoded image or sampled frame waiting for its group's alignment, and the slot its rows go to."""

    image: np.ndarray
    where: dict[str, Any]  # the row's source columns, frame_index and timestamp_s included
    path: str
    slot: list[dict[str, Any]]


class FaceFinder:
    """Decodes images and sampled video frames and aligns every face; Dlib models loaded once."""

    def __init__(self, job: Job) -> None:
        fetch = functools.partial(io.fetch_cached, storage=job.storage)
        self.job, self.faces, self.settings = job, job.faces, job.settings
        self.detector = load_detector(job.faces, fetch)
        self.predictor = load_predictor(job.faces, fetch)
        self.tree = io.Tree(job.source, job.storage)
        # `auto`: a first pass without upsampling; faces.upsample only where it found nothing in a small
        # image, and not when faces.min_face_px is beyond the first pass's reach (it found every face that wide).
        auto = job.settings.upsample == "auto"
        self.first = job.faces.model_copy(update={"upsample": 0}) if auto else job.faces
        reach = self.detector.reach(self.first.upsample)
        retry = auto and job.faces.upsample > 0 and (reach is None or job.faces.min_face_px < reach)
        self.retry_below = job.settings.upsample_below if retry else None
        self._pending: list[_Pending] = []
        self._pending_pixels = 0

    def find(self, units: list[Unit]) -> tuple[pa.Table, dict[str, float]]:
        """Draft rows (with raw chips) of the units, in unit, frame and face order."""
        slots: list[list[dict[str, Any]]] = []
        counters: Counter[str] = Counter()
        for unit in units:
            slots += self.unit_rows(unit, counters)
        self._flush()
        rows = [row for slot in slots for row in slot]
        return pa.Table.from_pylist(rows, schema=DRAFT_SCHEMA), dict(counters)

    def unit_rows(self, unit: Unit, counters: Counter[str]) -> list[list[dict[str, Any]]]:
        """The unit's rows as slots in order: a frame's slot is filled when its group is aligned (_flush)."""
        base = {
            "unit": unit.name,
            "source_path": self.tree.member_uri(unit.member) if unit.member else io.join(self.tree.uri, unit.relpath),
            "media_type": unit.media,
        }
        if unit.status != STATUS_OK:
            return [[self._status_row(base, unit, unit.status, unit.error)]]
        try:
            if unit.media == MEDIA_IMAGE:
                return self._image_rows(unit, base)
            return self._video_rows(unit, base, counters)
        except (MediaError, DecodeError) as error:  # rows of frames already queued are dropped with their slots
            return [[self._status_row(base, unit, error.status, str(error))]]

    @staticmethod
    def _status_row(base: dict[str, Any], unit: Unit, row_status: str, error: str | None) -> dict[str, Any]:
        return {**base, "id": row_id(unit.name, None, None), "status": row_status, "error": error}

    def _image_rows(self, unit: Unit, base: dict[str, Any]) -> list[list[dict[str, Any]]]:
        if unit.size > self.faces.limits.max_file_bytes:  # refused before its bytes are fetched
            raise DecodeError("too_large", f"{unit.size} bytes > limit {self.faces.limits.max_file_bytes}")
        assert unit.member is not None
        try:
            data = self.tree.read(unit.member)
        except io.READ_ERRORS as error:
            raise MediaError("read", *io.read_failure(error)) from None
        image = decode(data, self.faces.limits, self.faces.color)
        return [self._frame_rows(image, base, unit.relpath, None, None)]

    def _video_rows(self, unit: Unit, base: dict[str, Any], counters: Counter[str]) -> list[list[dict[str, Any]]]:
        assert unit.member is not None
        rows: list[list[dict[str, Any]]] = []
        with video.capture(self.tree, unit.member, self.settings) as cap:
            probe = video.probe(cap)
            fps = probe.fps
            reader = video.SegmentReader(cap, unit.start, unit.end, sample_step(fps, self.settings))
            for frame_index, frame in reader:
                height, width = frame.shape[:2]
                if height * width > self.faces.limits.max_image_pixels:
                    raise DecodeError("too_large", f"{width}x{height} frames > limit {self.faces.limits.max_image_pixels} pixels")
                pixels = video.to_pixels(frame, self.faces.color)
                rows.append(self._frame_rows(pixels, base, unit.relpath, frame_index, frame_index / fps))
        counters["video_seconds"] += reader.seconds(fps)
        if reader.ended_early:
            rows.append([self._status_row(base, unit, status("video", "short_read"),
                                          f"decoding stopped after frame {reader.last_frame}, segment ends at {unit.end}")])
        elif unit.end is None and video.cut_short(reader.position, probe.frames):
            # The last segment reads to the file's end; a file cut mid-stream ends before its header says.
            rows.append([self._status_row(base, unit, status("video", "short_read"),
                                          f"decoding stopped at frame {reader.position} of the {probe.frames} "
                                          "the container declares (cut short?)")])
        elif not rows:  # every decoded frame has a slot, so none were decoded
            rows.append([self._status_row(base, unit, status("video", "no_frames"), f"no frame decoded from frame {unit.start}")])
        return rows

    def _frame_rows(self, image: np.ndarray, base: dict[str, Any], path: str, frame: int | None,
                    timestamp: float | None) -> list[dict[str, Any]]:
        """The slot of one image or frame: filled now when too small, else when its group is aligned."""
        where = {**base, "frame_index": frame, "timestamp_s": timestamp}
        small = too_small(image)
        if small:
            return [{**where, "id": row_id(path, frame, None), "status": TOO_SMALL, "error": small}]
        slot: list[dict[str, Any]] = []
        self._pending.append(_Pending(image, where, path, slot))
        self._pending_pixels += image.size
        if len(self._pending) >= self.settings.align_group or self._pending_pixels >= GROUP_PIXELS:
            self._flush()
        return slot

    def aligned_rows(self, image: np.ndarray, base: dict[str, Any], path: str, frame: int | None = None,
                     timestamp: float | None = None) -> list[dict[str, Any]]:
        """The draft rows of one decoded image or frame, aligned now (with any frames still pending)."""
        slot = self._frame_rows(image, base, path, frame, timestamp)
        self._flush()
        return slot

    def _flush(self) -> None:
        """Align the pending frames as one group (faces.align_images) and fill their slots."""
        pending, self._pending, self._pending_pixels = self._pending, [], 0
        if not pending:
            return
        cap, most = self.settings.detect_max_side, self.settings.max_faces
        results = align_images([p.image for p in pending], self.detector, self.predictor, self.first, most, cap)
        retry = [k for k, (p, result) in enumerate(zip(pending, results))
                 if not result.faces and self.retry_below is not None and min(p.image.shape[:2]) < self.retry_below]
        if retry:
            again = align_images([pending[k].image for k in retry], self.detector, self.predictor, self.faces, most, cap)
            for k, result in zip(retry, again):
                results[k] = result
        for p, result in zip(pending, results):
            p.slot.extend(self._face_rows(p, result))

    @staticmethod
    def _face_rows(p: _Pending, result: AlignResult) -> list[dict[str, Any]]:
        frame = p.where["frame_index"]
        if not result.faces:
            return [{**p.where, "id": row_id(p.path, frame, None), "faces_found": 0, "status": NO_FACE,
                     "error": "no face detected"}]
        return [
            {**p.where, "id": row_id(p.path, frame, k), "face_index": k, "faces_found": result.faces_found,
             "bbox": list(face.bbox), "status": STATUS_OK, "chip": np.ascontiguousarray(face.chip).tobytes()}
            for k, face in enumerate(result.faces)
        ]
