"""Labelling: the Keras artifact applied to draft rows, giving labels, confidences and probabilities."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ferray.annotate.detect import DRAFT_SCHEMA
from ferray.annotate.job import Job
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, TRACK_FIELDS

log = logging.getLogger(__name__)


class Labeller:
    """The Keras artifact loaded once per actor (on its GPU when it has one), applied in batches."""

    def __init__(self, job: Job) -> None:
        from ferray.model import artifact
        from ferray.runtime import configure_tensorflow

        configure_tensorflow(job.settings.num_cpus, job.settings.num_gpus > 0)
        self.artifact = artifact.load(job.model.uri, job.storage)
        if self.artifact.version != job.model.version:
            raise artifact.ModelError(f"model at {job.model.uri} changed during the run "
                                      f"({job.model.version} planned, {self.artifact.version} found)")
        self.job = job
        self.channels = 1 if job.model.face_color == "gray" else 3

    def __call__(self, drafts: pa.Table) -> pa.Table:
        size, n = self.job.model.face_size, drafts.num_rows
        chips = drafts["chip"].to_pylist()
        rows = [i for i, chip in enumerate(chips) if chip is not None]
        labels: list[int | None] = [None] * n
        confidences: list[float | None] = [None] * n
        probs_column: list[list[float] | None] = [None] * n
        if rows:
            faces = np.stack([np.frombuffer(chips[i], np.uint8).reshape(size, size, self.channels) for i in rows])
            probs = self.artifact.predict(faces.astype(np.float32), self.job.settings.predict_batch, self.job.settings.flip_tta)
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
