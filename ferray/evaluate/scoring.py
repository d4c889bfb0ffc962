"""Labelled rows of any stage output, and a model's raw probabilities for them (head on embeddings, or faces)."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ferray.config import StorageSettings
from ferray.data import io
from ferray.data.schema import BACKBONE, EMBEDDING, FACE, LABELS, STATUS_OK
from ferray.errors import InputError
from ferray.model.artifact import Artifact
from ferray.model.embed import decode_faces
from ferray.model.head import HEAD_NAME

log = logging.getLogger(__name__)

ALL = "all"
# The small columns read first, to choose the split and the path before any embedding or face.
_INDEX_COLUMNS = ("id", "dataset", "split", "label", "label_name", "status", BACKBONE)

ScorePath = Literal["embeddings", "faces"]


@dataclass
class Rows:
    """The labelled rows an evaluation scores, and what was left out and why."""

    source: str
    split: str  # `train` | `val` | `test` | `all`
    path: ScorePath
    ids: list[str]
    datasets: list[str]
    splits: list[str | None]
    labels: np.ndarray  # int64 canonical indices
    embeddings: np.ndarray | None  # (N, D) on the embeddings path
    faces: list[bytes | None]  # aligned-face PNGs where DATA has them (the misclassified grid)
    ok_rows: int  # ok rows in DATA, every split
    outside_split: int  # ok rows of another split than the one scored
    skipped: Counter[str] = field(default_factory=Counter)  # by reason, within the split
    fingerprint: str = ""
    shards: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def data_fingerprint(source: str, shards: list[str], storage: StorageSettings) -> str:
    """sha256 over the shards' completion markers, which already fingerprint their whole lineage."""
    markers = []
    for uri in shards:
        name = uri.rsplit("/", 1)[-1][: -len(".parquet")]
        markers.append(str(io.read_json(io.join(source, io.MARKERS, f"{name}.json"), storage).get("fingerprint")))
    return hashlib.sha256("\n".join(markers).encode()).hexdigest()


def _schema_names(uri: str, storage: StorageSettings) -> set[str]:
    fs, path = io.url_to_fs(uri, storage)
    with fs.open(path, "rb") as handle:
        return set(pq.read_schema(handle).names)


def choose_split(index: pa.Table, requested: str | None) -> str:
    """The SPEC's default: `test` where DATA has labelled test rows, else every labelled row."""
    if requested:
        return requested
    if "split" not in index.schema.names:
        return ALL
    labelled_test = pc.and_(pc.equal(index["split"], "test"), pc.is_valid(index["label"]))
    return "test" if pc.any(labelled_test).as_py() else ALL


def choose_path(names: set[str], backbones: set[str], fingerprint: str | None, reuse: bool) -> ScorePath:
    """Embeddings when every scored row was embedded by the model's own backbone; else the faces."""
    if reuse and EMBEDDING in names and fingerprint and backbones == {fingerprint}:
        return "embeddings"
    if FACE not in names:
        found = ", ".join(sorted(backbones)) or "none"
        raise InputError(f"DATA has no aligned faces and no embeddings of this model's backbone "
                         f"{fingerprint} (found: {found}); embed it with that backbone or pass aligned shards")
    return "faces"


def _column(table: pa.Table, name: str) -> list[Any]:
    return table[name].to_pylist() if name in table.schema.names else [None] * table.num_rows


def _skip_reason(label: Any, label_name: str | None) -> str | None:
    if label is None:
        # CK+ `contempt` and unknown folder names: a class outside the canonical 7.
        return f"label_outside_7:{label_name or 'unlabelled'}"
    if not 0 <= int(label) < len(LABELS):
        return f"label_out_of_range:{label}"
    return None


def _take_shard(table: pa.Table, chosen: str, path: ScorePath, rows: Rows) -> np.ndarray | None:
    """Append one shard's scorable rows of split `chosen` to `rows`; count the rest by reason."""
    wanted = pc.equal(table["status"], STATUS_OK)
    if chosen != ALL:
        wanted = pc.and_(wanted, pc.fill_null(pc.equal(table["split"], chosen), False))
    table = table.filter(wanted)
    needed = EMBEDDING if path == "embeddings" else FACE
    present = pc.is_valid(table[needed]).to_pylist()
    keep = []
    # Row by row over the small columns only, so every row left out is counted with its reason.
    for i, (label, name) in enumerate(zip(table["label"].to_pylist(), _column(table, "label_name"))):
        reason = _skip_reason(label, name) or (None if present[i] else f"no_{needed}")
        if reason is None:
            keep.append(i)
        else:
            rows.skipped[reason] += 1
    table = table.take(pa.array(keep, pa.int64()))
    rows.ids += table["id"].to_pylist()
    rows.datasets += [d or "unknown" for d in _column(table, "dataset")]
    rows.splits += _column(table, "split")
    rows.faces += _column(table, FACE)
    rows.labels = np.concatenate([rows.labels, np.asarray(table["label"].to_numpy(), np.int64)])
    if path != "embeddings" or table.num_rows == 0:
        return None
    flat = pc.list_flatten(table[EMBEDDING]).to_numpy()
    return np.asarray(flat, np.float32).reshape(table.num_rows, -1)


def select(source: str, storage: StorageSettings, fingerprint: str | None, split: str | None,
           reuse_embeddings: bool = True) -> Rows:
    """Read the rows of `split` (see `choose_split`) with a usable label, counting every row left out.

    `fingerprint` is the model's backbone fingerprint: DATA embedded by it is scored by the head alone.
    """
    shards = io.completed_shards(source, storage)
    if not shards:
        raise io.StorageError(f"no finished shards under {source}")
    names = _schema_names(shards[0], storage)
    if not {"label", "status"} <= names:
        raise InputError(f"{source} has no label/status columns: not ferray stage output")
    if split not in (None, ALL) and "split" not in names:
        raise InputError(f"{source} has no split column; evaluate it with --split all")
    index_columns = [c for c in _INDEX_COLUMNS if c in names]
    index = io.read_table(shards, storage, index_columns)
    chosen = choose_split(index, split)
    splits = _column(index, "split")
    ok = [s == STATUS_OK for s in index["status"].to_pylist()]
    in_split = [good and (chosen == ALL or s == chosen) for s, good in zip(splits, ok)]
    backbones = {b for b, keep in zip(_column(index, BACKBONE), in_split) if keep and b}
    path = choose_path(names, backbones, fingerprint, reuse_embeddings)
    rows = Rows(source=source, split=chosen, path=path, ids=[], datasets=[], splits=[], labels=np.zeros(0, np.int64),
                embeddings=None, faces=[], ok_rows=sum(ok), outside_split=sum(ok) - sum(in_split),
                fingerprint=data_fingerprint(source, shards, storage), shards=len(shards))
    heavy = ([EMBEDDING] if path == "embeddings" else []) + ([FACE] if FACE in names else [])
    vectors = [_take_shard(io.read_parquet(uri, storage, index_columns + heavy), chosen, path, rows) for uri in shards]
    if path == "embeddings":
        parts = [v for v in vectors if v is not None and len(v)]
        rows.embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    log.info("evaluate: %s split %s, %d rows via %s, skipped %s", source, chosen, len(rows), path, dict(rows.skipped))
    return rows


def _batched(layer: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Eager calls in batches: `predict_on_batch` would retrace its tf.function for every new batch shape."""
    return np.concatenate([np.asarray(layer(x[i : i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])


def _decodable_faces(rows: Rows, size: int, channels: int) -> np.ndarray:
    """Decode every face; an undecodable one leaves the scored rows, counted as `bad_face`."""
    keep, faces = [], []
    for i, data in enumerate(rows.faces):
        try:
            faces.append(decode_faces([data], size, channels)[0])  # type: ignore[list-item]
            keep.append(i)
        except (ValueError, TypeError, cv2.error):
            rows.skipped["bad_face"] += 1
    if len(keep) < len(rows):
        rows.ids = [rows.ids[i] for i in keep]
        rows.datasets = [rows.datasets[i] for i in keep]
        rows.splits = [rows.splits[i] for i in keep]
        rows.faces = [rows.faces[i] for i in keep]
        rows.labels = rows.labels[keep]
    return np.stack(faces) if faces else np.zeros((0, size, size, channels), np.float32)


def raw_probabilities(artifact: Artifact, rows: Rows, batch_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(probs before temperature, embeddings, flip TTA applied) for the rows, via their path.

    The model is face → `backbone` → `head` (an ensemble: several of those, averaged); running the
    layers apart gives the embeddings (for t-SNE; an ensemble's are its members' side by side) at no
    extra cost and equals the whole model's output.
    """
    from ferray.model.ensemble import members

    parts = [(member.get_layer(HEAD_NAME), member) for member in members(artifact.model)]
    flip = bool(artifact.meta.get("inference", {}).get("flip_tta"))
    if rows.path == "embeddings":
        assert rows.embeddings is not None and len(parts) == 1
        head = parts[0][0]
        embeddings = rows.embeddings
        if len(embeddings) and embeddings.shape[1] != head.input_shape[-1]:
            raise InputError(f"DATA's embeddings have {embeddings.shape[1]} dims, the model's head takes "
                             f"{head.input_shape[-1]}")
        if flip:
            log.warning("evaluate: the model asks for flip TTA, which stored embeddings cannot give; "
                        "set evaluate.reuse_embeddings=false to score the faces with it")
        probs = _batched(head, embeddings, batch_size) if len(embeddings) else np.zeros((0, len(LABELS)), np.float32)
        return _normalised(probs), np.asarray(embeddings, np.float32), False
    from ferray.model.backbones import BACKBONE_LAYER  # imports TensorFlow: only once there is a model to run

    size, _, channels = parts[0][1].get_layer(BACKBONE_LAYER).input_shape[1:]
    faces = _decodable_faces(rows, int(size), int(channels))
    member_probs, member_embeddings = [], []
    for head, member in parts:
        backbone = member.get_layer(BACKBONE_LAYER)
        if not len(faces):
            member_probs.append(np.zeros((0, len(LABELS)), np.float32))
            member_embeddings.append(np.zeros((0, head.input_shape[-1]), np.float32))
            continue
        embeddings = _batched(backbone, faces, batch_size)
        probs = _batched(head, embeddings, batch_size)
        if flip:
            # The artifact's own TTA: mean of the probabilities of the face and its mirror image.
            probs = (probs + _batched(head, _batched(backbone, faces[:, :, ::-1], batch_size), batch_size)) / 2.0
        member_probs.append(probs)
        member_embeddings.append(np.asarray(embeddings, np.float32))
    return _normalised(np.mean(member_probs, axis=0)), np.concatenate(member_embeddings, axis=1), flip


def _normalised(probs: np.ndarray) -> np.ndarray:
    probs = probs.astype(np.float64)
    # float32 softmax sums drift by ~1e-7; scikit-learn's log loss wants rows that sum to one.
    return probs / probs.sum(axis=1, keepdims=True)
