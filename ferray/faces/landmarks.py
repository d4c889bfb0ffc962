"""Facial landmarks (Dlib's 5- or 68-point shape predictor) and what alignment reads from them."""

from __future__ import annotations

import math

import dlib
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import LANDMARK_MODEL_FILES, Fetch, MissingModelError, load_model, resolve_model


def load_predictor(settings: FacesSettings, fetch: Fetch | None = None) -> dlib.shape_predictor:
    """Build the landmark predictor and check it yields the configured number of points."""
    filename = LANDMARK_MODEL_FILES[settings.landmarks]
    path = resolve_model(filename, settings.landmarks_model, "landmarks_model", fetch)
    predictor = load_model(dlib.shape_predictor, path, "landmarks_model")
    # An override may be a different model; get_face_chip only understands 5- or 68-point shapes.
    parts = predictor(np.zeros((8, 8), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
    if parts != settings.landmarks:
        raise MissingModelError(
            f"faces.landmarks_model {path} predicts {parts} points, faces.landmarks={settings.landmarks}"
        )
    return predictor


def predict_landmarks(
    image: np.ndarray, box: Box | dlib.rectangle, predictor: dlib.shape_predictor
) -> dlib.full_object_detection:
    """Landmarks of the face in `box`."""
    rect = box if isinstance(box, dlib.rectangle) else dlib.rectangle(box.left, box.top, box.right, box.bottom)
    return predictor(np.ascontiguousarray(image), rect)


def landmark_points(shape: dlib.full_object_detection) -> np.ndarray:
    """Landmarks as an (n, 2) float array of x, y source pixels."""
    return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float32)


def eye_line_angle(landmarks: dlib.full_object_detection | np.ndarray) -> float:
    """Angle in degrees of the line between the eye centres (0 = level), from 5 or 68 points."""
    if isinstance(landmarks, dlib.full_object_detection):
        landmarks = landmark_points(landmarks)
    points = np.asarray(landmarks, np.float64)
    if len(points) == 5:  # 0-1 one eye's corners, 2-3 the other's, 4 under the nose
        first, second = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
    elif len(points) == 68:  # iBUG: 36-41 and 42-47 are the eyes
        first, second = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    else:
        raise ValueError(f"expected 5 or 68 landmarks, got {len(points)}")
    left, right = (first, second) if first[0] <= second[0] else (second, first)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
