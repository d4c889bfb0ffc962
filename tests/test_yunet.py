"""The YuNet detector (faces.detector=yunet) on real FER-2013 faces: it finds them, its boxes sit where
HOG's do, alignment from them matches, and `ferray annotate` runs with it (and the LiteRT classifier)."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest

from ferray import annotate, faces
from ferray.config import FacesSettings, load_settings
from ferray.faces.blazeface import BLAZE_REACH
from ferray.faces.yunet import YUNET_REACH, YUNET_SEES
from test_annotate import all_rows
from test_faces import SAMPLES, canvas, load_face

HOG = FacesSettings()
YUNET = HOG.model_copy(update={"detector": "yunet"})


def iou(a: faces.Box, b: faces.Box) -> float:
    w = max(0, min(a.right, b.right) - max(a.left, b.left) + 1)
    h = max(0, min(a.bottom, b.bottom) - max(a.top, b.top) + 1)
    return w * h / (a.width() * a.height() + b.width() * b.height() - w * h)


@pytest.mark.parametrize(("name", "reach"), [("yunet", YUNET_REACH), ("blazeface", BLAZE_REACH),
                                             ("blazeface_short", BLAZE_REACH), ("blazeface_cascade", BLAZE_REACH)])
def test_cnn_detectors_find_the_faces_hog_finds_with_boxes_close_to_hogs(name: str, reach: int) -> None:
    """YuNet and BlazeFace (tests/test_blazeface.py) against HOG: boxes mapped onto HOG's, same landmarks."""
    hog, cnn = faces.load_detector(HOG), faces.load_detector(HOG.model_copy(update={"detector": name}))
    predictor = faces.load_predictor(HOG)
    assert cnn.reach(0) == reach and cnn.reach(1) == reach / 2
    rng = random.Random(0)
    found = {"hog": 0, name: 0}
    overlaps, shifts = [], []
    for path in SAMPLES:
        image, (x, y, w, h) = canvas(load_face(path), rng)  # a 144–192 px face on a canvas up to 420 px
        by_hog = faces.detect_faces(image, hog, 0)
        by_cnn = faces.detect_faces(image, cnn, 0)
        found["hog"] += bool(by_hog)
        found[name] += bool(by_cnn)
        if by_cnn:  # on the pasted face, not on the background
            box = by_cnn[0]
            assert x <= (box.left + box.right) / 2 <= x + w and y <= (box.top + box.bottom) / 2 <= y + h
        if by_hog and by_cnn:
            overlaps.append(iou(by_hog[0], by_cnn[0]))
            # The same 5 landmarks from either box: alignment does not depend on the detector.
            a = faces.landmark_points(faces.predict_landmarks(image, by_hog[0], predictor))
            b = faces.landmark_points(faces.predict_landmarks(image, by_cnn[0], predictor))
            shifts.append(float(np.abs(a - b).max()) / by_hog[0].width())
    assert found[name] >= found["hog"] and found[name] >= 0.9 * len(SAMPLES), found
    assert len(overlaps) >= 0.8 * len(SAMPLES)
    assert np.median(overlaps) > 0.7 and min(overlaps) > 0.4, overlaps
    assert np.median(shifts) < 0.03, shifts


def test_yunet_detects_on_a_copy_scaled_to_the_faces_wanted() -> None:
    """At upsample 0 a face of YUNET_REACH px is looked for at YUNET_SEES px: a 640×480 photo is searched at
    half size, and the 192 px face's box comes back in the photo's pixels."""
    face = load_face(SAMPLES[0])
    photo = np.full((480, 640), 100, np.uint8)
    photo[120:312, 300:492] = cv2.resize(face, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    yunet = faces.load_detector(YUNET)
    seen: list[tuple[int, ...]] = []
    detect = yunet._detect
    yunet._detect = lambda image: seen.append(image.shape) or detect(image)  # type: ignore[method-assign]
    (box,) = yunet(photo, 0)
    scale = YUNET_SEES / YUNET_REACH
    assert seen == [(round(480 * scale), round(640 * scale), 3)]
    assert 290 <= box.left and box.right <= 500 and 110 <= box.top and box.bottom <= 330 and box.width() > 120, box


def test_yunet_refuses_a_detector_model_file() -> None:
    with pytest.raises(faces.MissingModelError, match="yunet"):
        faces.load_detector(YUNET.model_copy(update={"detector_model": "/tmp/x.svm"}))


@pytest.mark.parametrize("detector", ["yunet", "blazeface"])
def test_annotate_with_a_cnn_detector_and_the_lite_classifier(ray_session: None, model_dir: Path, tmp_path: Path,
                                                              detector: str) -> None:
    """A real run on Ray: every canvas gets a face row from the detector, labelled by the LiteRT graph, which
    the labeller exported beside the artifact (keyed by the model's sha256) and a second run finds."""
    rng = random.Random(1)
    source = tmp_path / "photos"
    source.mkdir()
    for k, path in enumerate(SAMPLES[:6]):
        image, _ = canvas(load_face(path), rng)
        cv2.imwrite(str(source / f"p{k}.{'png' if k % 2 else 'jpg'}"), image)
    settings = load_settings(ray={"progress_bars": False}, faces={"detector": detector},
                             annotate={"runtime": "tflite"})
    summary = annotate.run(settings, str(model_dir), str(source), str(tmp_path / "out"))
    rows = all_rows(str(tmp_path / "out"), settings.storage)
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    assert summary.rows == rows.num_rows and ok.num_rows >= 5
    assert all(abs(sum(p) - 1) < 1e-4 for p in ok["probs"].to_pylist())
    assert list(model_dir.glob("model-*.float32.tflite")), "the graph is cached beside the artifact"
