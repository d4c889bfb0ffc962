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
