"""Labelling: the model (Keras or its LiteRT graph) applied to draft rows, giving labels, confidences and probabilities."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from ferray.annotate.detect import DRAFT_SCHEMA
from ferray.annotate.job import Job
from ferray.data import io
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, TRACK_FIELDS

log = logging.getLogger(__name__)


def _check_version(version: str, job: Job) -> None:
    from ferray.model import artifact

    if version != job.model.version:
        raise artifact.ModelError(f"model at {job.model.uri} changed during the run "
                                  f"({job.model.version} planned, {version} found)")


class Labeller:
    """The model loaded once per actor: the Keras artifact (on its GPU when it has one), or its LiteRT graph
    (annotate.runtime tflite: no TensorFlow unless the graph must first be exported), applied in batches."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.channels = 1 if job.model.face_color == "gray" else 3
        self.model = self._lite(job) if job.settings.runtime == "tflite" else self._keras(job)

    @staticmethod
    def _keras(job: Job) -> Any:
        from ferray.model import artifact
        from ferray.runtime import configure_tensorflow

        configure_tensorflow(job.settings.num_cpus, job.settings.num_gpus > 0)
        loaded = artifact.load(job.model.uri, job.storage)
        _check_version(loaded.version, job)
        return loaded

    @staticmethod
    def _lite(job: Job) -> Any:
        from ferray.model import artifact, cascade, lite

        folder, meta = artifact.read_meta(job.model.uri, job.storage)  # a member: its own TTA and temperature
        _check_version(artifact.Artifact(uri=folder, model=None, meta=meta).version, job)
        threads = max(1, int(job.settings.num_cpus))
        chosen = cascade.Cascade.from_meta(meta) if job.model.lite_precision == cascade.PRECISION else None
        if chosen is not None:  # each member's graphs, found here or converted once, here
            return lite.CascadeModel.load(job.model.uri, chosen, meta, job.storage, threads)
        uri = job.model.lite_uri
        if uri is None or not io.exists(uri, job.storage):  # not on this machine yet: converted once, here
            uri = lite.export(job.model.uri, job.storage, job.model.lite_precision)  # type: ignore[arg-type]
        return lite.LiteModel(uri, meta, job.storage, threads=threads)

    def classify(self, faces: np.ndarray) -> np.ndarray:
        """Probabilities of raw faces (N, s, s, c), float32, in batches of annotate.predict_batch or the runtime's own."""
        settings = self.job.settings
        batch = {"batch_size": settings.predict_batch} if settings.predict_batch else {}
        return self.model.predict(faces, flip_tta=settings.flip_tta, **batch)

    def __call__(self, drafts: pa.Table) -> pa.Table:
        size, n = self.job.model.face_size, drafts.num_rows
        chips = drafts["chip"].to_pylist()
        rows = [i for i, chip in enumerate(chips) if chip is not None]
        labels: list[int | None] = [None] * n
        confidences: list[float | None] = [None] * n
        probs_column: list[list[float] | None] = [None] * n
        if rows:
            faces = np.stack([np.frombuffer(chips[i], np.uint8).reshape(size, size, self.channels) for i in rows])
            probs = self.classify(faces.astype(np.float32))
            for i, p in zip(rows, probs):
                labels[i] = int(p.argmax())
                confidences[i] = float(p.max())
                probs_column[i] = p.tolist()
        columns = {name: drafts[name] for name in DRAFT_SCHEMA.names if name != "chip"}
        columns["label"] = pa.array(labels, pa.int8())
        columns["label_name"] = pa.array([LABELS[k] if k is not None else None for k in labels], pa.string())
        columns["confidence"] = pa.array(confidences, pa.float32())
        columns["probs"] = pa.array(probs_column, ANNOTATION_SCHEMA.field("probs").type)
        columns["model_version"] = pa.array([self.job.model.version] * n, pa.string())
        columns.update({f.name: pa.nulls(n, f.type) for f in TRACK_FIELDS})  # filled once the video is done
        return pa.table({name: columns[name] for name in ANNOTATION_SCHEMA.names}, schema=ANNOTATION_SCHEMA)
