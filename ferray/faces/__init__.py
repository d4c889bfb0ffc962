"""Faces: detectors (boxes in pixels and their reach), landmarks, aligned chips, and the align stage.

This module stays light (no Dlib import): ferray.config validates `faces.detector` against DETECTORS,
and the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# faces.detector -> "module:loader". A new detector is one module with `load(settings, fetch) -> Detector`
# (ferray.faces.detect) and one line here.
DETECTORS: dict[str, str] = {
    "hog": "ferray.faces.hog:load",
    "mmod": "ferray.faces.mmod:load",
    "yunet": "ferray.faces.yunet:load",
    "blazeface": "ferray.faces.blazeface:load",
    "blazeface_short": "ferray.faces.blazeface:load_short_range",
    "blazeface_cascade": "ferray.faces.blazeface:load_short_then_back",
}

# `faces.detector: auto` (the default) is the detector each command measured best for its input:
# the paper's HOG for `ferray align` on the datasets' face crops; for `ferray annotate` on photos and
# video frames the one chosen by the annotation bench (docs/benchmarks-annotate.md).
AUTO_DETECTOR: dict[str, str] = {"align": "hog", "annotate": "blazeface_cascade"}

_EXPORTS: dict[str, str] = {
    "ferray.faces.models": "Fetch LANDMARK_MODEL_FILES MissingModelError bundled_models_dir resolve_model",
    "ferray.faces.detect": "Box Detector detect_faces detection_scale load_detector",
    "ferray.faces.hog": "HOG_REACH",
    "ferray.faces.mmod": "MMOD_MODEL_FILE",
    "ferray.faces.yunet": "YUNET_REACH",
    "ferray.faces.landmarks": "eye_line_angle landmark_points load_predictor predict_landmarks",
    "ferray.faces.align": "MIN_IMAGE_SIDE TOO_SMALL AlignResult AlignStage AlignedFace align_face align_image "
                          "align_images clip_bbox encode_png full_frame_face resize_bicubic too_small",
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names.split()}
__all__ = ["AUTO_DETECTOR", "DETECTORS", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ferray.faces' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
