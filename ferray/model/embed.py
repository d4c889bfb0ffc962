"""`ferray embed`: frozen-backbone embeddings of aligned faces, computed once per backbone identity."""

from __future__ import annotations

import functools
import logging
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from ferray import executor
from ferray.config import BackboneSettings, Settings, StorageSettings
from ferray.data import io
from ferray.data.schema import BACKBONE, EMBEDDED_SCHEMA, EMBEDDING, FACE, STATUS_OK, status
from ferray.executor import Resources, RowStage, ShardUnit, Summary, upstream_units

log = logging.getLogger(__name__)


def decode_faces(faces: list[bytes], size: int, channels: int) -> np.ndarray:
    """Aligned-face PNGs → float32 (N, size, size, channels) in the 0..255 range the backbone expects."""
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    out = np.empty((len(faces), size, size, channels), np.float32)
    for index, data in enumerate(faces):
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if pixels is None:
            raise ValueError("undecodable face PNG")
        if channels == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        if pixels.shape[:2] != (size, size):
            pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_CUBIC)
        out[index] = pixels.reshape(size, size, channels)
    return out


class Embed(RowStage):
    """The embed stage: the frozen backbone built once per actor, applied to batches of aligned faces."""

    name = "embed"
    version = 1
    schema = EMBEDDED_SCHEMA

    def __init__(self, backbone: BackboneSettings, face_size: int, storage: StorageSettings) -> None:
        super().__init__(storage)
        self.backbone, self.face_size, self.channels = backbone, face_size, backbone.channels
        self.resources = Resources(num_cpus=backbone.num_cpus, num_gpus=backbone.num_gpus, batch_size=backbone.batch_size)
        self.model: Any = None
        self.fingerprint = ""

    def setup(self) -> None:
        from ferray.model.backbones import backbone_fingerprint, build_backbone, resolve_weights

        from ferray.runtime import configure_tensorflow

        configure_tensorflow(self.backbone.num_cpus, self.backbone.num_gpus > 0)
        fetch = functools.partial(io.fetch_cached, storage=self.storage)
        weights = resolve_weights(self.backbone, fetch)
        self.model = build_backbone(self.backbone, fetch, weights=weights, image_size=self.face_size)
        self.fingerprint = backbone_fingerprint(self.backbone, weights, image_size=self.face_size)

    def batch(self, table: pa.Table) -> pa.Table:
        """Adds `embedding` and `backbone`; a face that does not decode becomes `embed:bad_face`."""
        statuses = table["status"].to_pylist()
        errors = table["error"].to_pylist()
        faces = table[FACE]
        decodable, pixels = [], []
        for i in (i for i, s in enumerate(statuses) if s == STATUS_OK):
            try:
                pixels.append(decode_faces([faces[i].as_py()], self.face_size, self.channels)[0])
                decodable.append(i)
            except (ValueError, TypeError, cv2.error) as error:
                statuses[i], errors[i] = status("embed", "bad_face"), str(error)[:200]
        embeddings: list[np.ndarray | None] = [None] * table.num_rows
        names: list[str | None] = [None] * table.num_rows
        if decodable:
            vectors = np.asarray(self.model.predict_on_batch(np.stack(pixels)), np.float32)
            for i, vector in zip(decodable, vectors):
                embeddings[i], names[i] = vector, self.fingerprint
        out = table.set_column(table.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
        out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        return out.append_column(EMBEDDING, embedding_column(embeddings)).append_column(BACKBONE, pa.array(names, pa.string()))


def embedding_column(vectors: list[np.ndarray | None]) -> pa.Array:
    """list<float32> from numpy vectors without a Python float per value (nulls where None)."""
    present = [v for v in vectors if v is not None]
    flat = np.concatenate(present).astype(np.float32) if present else np.empty(0, np.float32)
    offsets, mask, at = [0], [], 0
    for vector in vectors:
        at += 0 if vector is None else len(vector)
        offsets.append(at)
        mask.append(vector is None)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float32()),
                                    mask=pa.array(mask, pa.bool_()))


def units(settings: Settings, source: str, storage: StorageSettings) -> list[ShardUnit]:
    from ferray.model.backbones import backbone_fingerprint

    fetch = functools.partial(io.fetch_cached, storage=storage)
    # The fingerprint names the backbone, its weights' sha256, sizes and preprocessing: the cache key.
    identity = backbone_fingerprint(settings.backbone, fetch=fetch, image_size=settings.faces.size)
    return upstream_units(source, storage, {"stage": "embed", "backbone": identity, "face_size": settings.faces.size,
                                            "batch_size": settings.backbone.batch_size})


def run(settings: Settings, source: str, out: str) -> Summary:
    """Embed every ok aligned face under SOURCE into OUT; finished shards of the same backbone are reused."""
    storage = settings.storage
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    stage = Embed(settings.backbone, settings.faces.size, storage)
    summary = executor.run(stage, units(settings, source, storage), source, out, storage, settings.ray)
    executor.write_meta(out, summary, settings, storage)
    return summary
