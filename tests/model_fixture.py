"""A small real model artifact for tests: Lite0 ImageNet backbone + a head fitted on the bundled faces."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from conftest import SAMPLE_ZIP
from ferray.model import artifact
from ferray.model.backbones import backbone_metadata, build_backbone, resolve_weights
from ferray.config import Settings
from ferray.data.schema import LABEL_INDEX


def sample_faces() -> tuple[np.ndarray, np.ndarray]:
    """The 35 bundled FER-2013 faces (48×48 grey, already face crops) and their labels."""
    import cv2

    faces, labels = [], []
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        for name in sorted(archive.namelist()):
            pixels = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
            faces.append(pixels[..., None].astype(np.float32))
            labels.append(LABEL_INDEX[name.split("/")[1]])
    return np.stack(faces), np.array(labels)


def build_artifact(settings: Settings, out: Path, hidden: int = 64, seed: int = 0) -> Path:
    """Fit the paper's head (Keras 3, in process) on the sample's embeddings and save the artifact."""
    import keras

    from ferray.model.head import build_head

    weights = resolve_weights(settings.backbone)
    backbone = build_backbone(settings.backbone, weights=weights, image_size=settings.faces.size)
    faces, labels = sample_faces()
    embeddings = backbone.predict_on_batch(faces)
    head = build_head(keras, embeddings.shape[1], hidden, 0.0)
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    head.fit(embeddings, labels, epochs=60, batch_size=35, verbose=0)
    model = artifact.assemble(backbone, head.get_weights())
    accuracy = float((model.predict_on_batch(faces).argmax(1) == labels).mean())
    meta = artifact.metadata(settings, backbone_metadata(settings.backbone, weights, settings.faces.size),
                             {"sample_train_accuracy": accuracy}, data_fingerprint="tests:fer2013-sample")
    artifact.save(model, meta, str(out), settings.storage)
    return out
