"""Dlib's HOG face detector: the built-in frontal model, or a custom `.svm` (faces.detector_model)."""

from __future__ import annotations

import dlib
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, load_model, resolve_model

# The smallest face Dlib's built-in HOG detector finds without upsampling (its window is 80×80 px; the
# boxes it reports are from about 73 px wide). Each upsampling step halves it.
HOG_REACH = 80


class Hog:
    """HOG + linear SVM; one thread per call."""

    def __init__(self, model: dlib.fhog_object_detector, builtin: bool) -> None:
        self.model, self.builtin = model, builtin

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        return [Box(r.left(), r.top(), r.right(), r.bottom()) for r in self.model(image, upsample)]

    def reach(self, upsample: int) -> float | None:
        # A custom .svm has its own window, which ferray does not know.
        return HOG_REACH / 2**upsample if self.builtin else None


def load(settings: FacesSettings, fetch: Fetch | None = None) -> Hog:
    if settings.detector_model is None:
        return Hog(dlib.get_frontal_face_detector(), builtin=True)
    path = resolve_model("", settings.detector_model, "detector_model", fetch)
    return Hog(load_model(dlib.fhog_object_detector, path, "detector_model"), builtin=False)
