"""Column names, status values, Arrow schemas and the canonical label map."""

from __future__ import annotations

import pyarrow as pa

# Canonical classes in FER-2013's index order (SPEC: Labels).
LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

# Names the datasets use for the same seven expressions; anything else (CK+ `contempt`, an
# unknown folder name) keeps its own name and a null label.
LABEL_SYNONYMS: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "an": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "di": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "scared": "fear",
    "fe": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "ha": "happy",
    "sad": "sad",
    "sadness": "sad",
    "sa": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "su": "surprise",
    "neutral": "neutral",
    "ne": "neutral",
}

SPLITS: tuple[str, ...] = ("train", "val", "test")

STATUS_OK = "ok"


def canonical_label(name: str) -> tuple[int | None, str]:
    """Map a dataset's class name onto (canonical index or None, label_name)."""
    key = name.strip().lower()
    canonical = LABEL_SYNONYMS.get(key)
    if canonical is None:
        return None, key
    return LABEL_INDEX[canonical], canonical


def status(stage: str, reason: str) -> str:
    """Compose a non-ok status value, e.g. `decode:truncated`."""
    return f"{stage}:{reason}"


INGEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("label_name", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
INGEST_COLUMNS: tuple[str, ...] = tuple(INGEST_SCHEMA.names)

# Columns the align stage adds (SPEC: aligned rows).
FACE, BBOX, FACE_SOURCE, FACES_FOUND = "face", "bbox", "face_source", "faces_found"
ALIGN_FIELDS: tuple[pa.Field, ...] = (
    pa.field(FACE, pa.binary()),
    pa.field(BBOX, pa.list_(pa.int32(), 4)),
    pa.field(FACE_SOURCE, pa.string()),
    pa.field(FACES_FOUND, pa.int32()),
)
ALIGNED_SCHEMA = pa.schema(list(INGEST_SCHEMA) + list(ALIGN_FIELDS))

# Columns the embedding stage adds (SPEC: embedded rows).
EMBEDDING, BACKBONE = "embedding", "backbone"
EMBED_FIELDS: tuple[pa.Field, ...] = (pa.field(EMBEDDING, pa.list_(pa.float32())), pa.field(BACKBONE, pa.string()))
EMBEDDED_SCHEMA = pa.schema(list(ALIGNED_SCHEMA) + list(EMBED_FIELDS))

# Annotation rows (SPEC: Annotation rows): one per face, or one status row for an image, a sampled
# frame or a whole file without one. `unit` names the work unit (an image, or `video@segment/of`).
MEDIA_IMAGE, MEDIA_VIDEO = "image", "video"
# Filled on video face rows once every segment of the video is done (ferray.annotate.tracks; null on images
# and until then): the same person across frames and segments, and its label smoothed over time
# (null when annotate.smooth_seconds is 0). The raw label, confidence and probs are never changed.
TRACK_FIELDS: tuple[pa.Field, ...] = (
    pa.field("track_id", pa.int32()),
    pa.field("smoothed_probs", pa.list_(pa.float32(), len(LABELS))),
    pa.field("smoothed_label", pa.int8()),
    pa.field("smoothed_label_name", pa.string()),
)
ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("media_type", pa.string()),
        pa.field("frame_index", pa.int64()),
        pa.field("timestamp_s", pa.float64()),
        pa.field("face_index", pa.int32()),
        pa.field(FACES_FOUND, pa.int32()),
        pa.field(BBOX, pa.list_(pa.int32(), 4)),
        pa.field("label", pa.int8()),
        pa.field("label_name", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("probs", pa.list_(pa.float32(), len(LABELS))),
        *TRACK_FIELDS,
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

# One row per video (SPEC: `OUT/videos/`): share of sampled time per expression of the largest face.
VIDEO_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("frames_sampled", pa.int64()),
        pa.field("frames_with_face", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("faces_per_frame", pa.float64()),
        pa.field("max_faces_per_frame", pa.int32()),
        *[pa.field(f"share_{name}", pa.float64()) for name in LABELS],
        pa.field("share_no_face", pa.float64()),
        pa.field("dominant_label", pa.int8()),
        pa.field("dominant_label_name", pa.string()),
        pa.field("mean_confidence", pa.float64()),
        pa.field("error_rows", pa.int64()),
        pa.field("timeline", pa.string()),
        pa.field("tracks", pa.int32()),
        pa.field("tracks_timeline", pa.string()),
    ]
)

# One row per face track of a video (`OUT/tracks/<video>.parquet`, ferray.annotate.tracks): when the person
# was on screen and the share of their seen frames in each expression (smoothed labels when
# `smoothing_s` > 0, else the raw ones).
TRACK_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("track_id", pa.int32(), nullable=False),
        pa.field("first_seen_s", pa.float64()),
        pa.field("last_seen_s", pa.float64()),
        pa.field("seconds_on_screen", pa.float64()),
        pa.field("frames_seen", pa.int64()),
        pa.field("frames_missed", pa.int64()),
        pa.field("mean_bbox", pa.list_(pa.int32(), 4)),
        *[pa.field(f"share_{name}", pa.float64()) for name in LABELS],
        pa.field("dominant_label", pa.int8()),
        pa.field("dominant_label_name", pa.string()),
        pa.field("mean_confidence", pa.float64()),
        pa.field("smoothing_s", pa.float64()),
    ]
)
