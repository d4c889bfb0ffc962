"""Dlib's MMOD CNN face detector (`mmod_human_face_detector.dat`): slower, finds more poses."""

from __future__ import annotations

import dlib
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, load_model, resolve_model

MMOD_MODEL_FILE = "mmod_human_face_detector.dat"


class Mmod:
    """The CNN detector; its reach is not published, so detection never shrinks the image for it."""

    def __init__(self, model: dlib.cnn_face_detection_model_v1) -> None:
        self.model = model

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        return [Box(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in self.model(image, upsample)]

    def reach(self, upsample: int) -> float | None:
        return None


def load(settings: FacesSettings, fetch: Fetch | None = None) -> Mmod:
    path = resolve_model(MMOD_MODEL_FILE, settings.detector_model, "detector_model", fetch)
    return Mmod(load_model(dlib.cnn_face_detection_model_v1, path, "detector_model"))
