"""`ferray embed`: frozen-backbone embeddings of aligned faces, computed once per backbone identity."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from ferray import io
from ferray.config import BackboneSettings, FacesSettings, Settings, StorageSettings
from ferray.schema import BACKBONE, EMBEDDED_SCHEMA, EMBEDDING, FACE, STATUS_OK, status
from ferray.shards import StageSpec, Summary, run_stage

log = logging.getLogger(__name__)


def configure_tensorflow(threads: int, use_gpu: bool) -> None:
    """Thread pools sized to the actor's CPUs, and GPU memory growth so actors can share a card."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:  # already initialised in this process (tests, a reused worker)
        pass
    for gpu in tf.config.list_physical_devices("GPU") if use_gpu else []:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


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


class EmbedStage:
    """Ray Data stage: the frozen backbone built once per actor, applied to batches of aligned faces."""

    NUM_CPUS: ClassVar[float] = 1.0
    BATCH_SIZE: ClassVar[int] = 128

    def __init__(self, backbone: BackboneSettings, face_size: int, storage: StorageSettings) -> None:
        from ferray.backbone import backbone_fingerprint, build_backbone, resolve_weights

        configure_tensorflow(max(1, int(backbone.num_cpus)), backbone.num_gpus > 0)
        fetch = functools.partial(io.fetch_cached, storage=storage)
        weights = resolve_weights(backbone, fetch)
        self.model = build_backbone(backbone, fetch, weights=weights, image_size=face_size)
        self.fingerprint = backbone_fingerprint(backbone, weights, image_size=face_size)
        self.face_size, self.channels = face_size, backbone.channels
        self.BATCH_SIZE = backbone.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["status"])
        embeddings = np.empty(n, dtype=object)
        names = np.empty(n, dtype=object)
        statuses = batch["status"].copy()
        errors = batch["error"].copy()
        rows = [i for i in range(n) if statuses[i] == STATUS_OK]
        decodable = []
        faces = []
        for i in rows:
            try:
                faces.append(decode_faces([batch[FACE][i]], self.face_size, self.channels)[0])
                decodable.append(i)
            except (ValueError, TypeError, cv2.error) as error:
                statuses[i], errors[i] = status("embed", "bad_face"), str(error)[:200]
        if decodable:
            vectors = np.asarray(self.model.predict_on_batch(np.stack(faces)), np.float32)
            for i, vector in zip(decodable, vectors):
                embeddings[i] = vector
                names[i] = self.fingerprint
        out = dict(batch)
        out.update({"status": statuses, "error": errors, EMBEDDING: embeddings, BACKBONE: names})
        return out


@dataclass(frozen=True)
class EmbedFactory:
    backbone: BackboneSettings
    faces: FacesSettings
    storage: StorageSettings

    def __call__(self) -> EmbedStage:
        return EmbedStage(self.backbone, self.faces.size, self.storage)


def spec(settings: Settings, storage: StorageSettings) -> StageSpec:
    from ferray.backbone import backbone_fingerprint

    fetch = functools.partial(io.fetch_cached, storage=storage)
    # The fingerprint names the backbone, its weights' sha256, sizes and preprocessing: the cache key.
    identity = backbone_fingerprint(settings.backbone, fetch=fetch, image_size=settings.faces.size)
    return StageSpec(
        name="embed",
        factory=EmbedFactory(settings.backbone, settings.faces, storage),
        schema=EMBEDDED_SCHEMA,
        config={"backbone": identity, "face_size": settings.faces.size, "batch_size": settings.backbone.batch_size},
        num_cpus=settings.backbone.num_cpus,
        num_gpus=settings.backbone.num_gpus,
    )


def run(settings: Settings, source: str, out: str) -> Summary:
    """Embed every ok aligned face under SOURCE into OUT; finished shards of the same backbone are reused."""
    storage = settings.storage.resolved()
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    summary = run_stage(spec(settings, storage), source, out, storage, settings.ray)
    io.write_json(io.join(out, io.META, "embed.json"), {"summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
    return summary
