"""The detector contract: boxes in source pixels and the smallest face found; detectors by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple, Protocol

import cv2
import numpy as np

from ferray.config import FacesSettings
from ferray.faces import DETECTORS
from ferray.faces.models import Fetch

class Box(NamedTuple):
    """A detection in source pixels, corners inclusive (Dlib's convention); it may overhang the image."""

    left: int
    top: int
    right: int
    bottom: int

    @classmethod
    def square(cls, cx: float, cy: float, side: float) -> Box:
        """The square box of `side` px centred on (cx, cy): the shape of Dlib's HOG boxes."""
        left, top = round(cx - side / 2), round(cy - side / 2)
        size = max(1, round(side))
        return cls(left, top, left + size - 1, top + size - 1)

    def width(self) -> int:
        return self.right - self.left + 1

    def height(self) -> int:
        return self.bottom - self.top + 1


class Detector(Protocol):
    """Finds faces in a grey or RGB uint8 image."""

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        """Boxes of the faces found, in the image's pixels, `upsample` times upsampled first."""
        ...

    def reach(self, upsample: int) -> float | None:
        """The smallest face width (px) found at this upsampling; None when not known."""
        ...


def load_detector(settings: FacesSettings, fetch: Fetch | None = None) -> Detector:
    """The configured detector (`faces.detector`, one of ferray.faces.DETECTORS), model files through `fetch`.

    `auto` loads align's detector: commands resolve it first (`FacesSettings.for_command`)."""
    module, _, name = DETECTORS[settings.for_command("align").detector].partition(":")
    loader: Callable[[FacesSettings, Fetch | None], Detector] = getattr(importlib.import_module(module), name)
    return loader(settings, fetch)


def detection_scale(height: int, width: int, max_side: int | None = None, reach: float | None = None,
                    min_face: int = 0) -> float:
    """How much to shrink an image before detection (1.0: not at all).

    `max_side` caps its longer side. `reach` is the smallest face the detector finds at this upsampling;
    when every face wanted is at least `min_face` px wide and that is more than the reach, a copy where
    such a face is `reach` px wide finds them all, for a fraction of the work (HOG's cost grows with pixels).
    """
    scale = max_side / max(height, width) if max_side and max(height, width) > max_side else 1.0
    if reach and min_face > reach:
        scale = min(scale, reach / min_face)
    return scale


def detect_faces(image: np.ndarray, detector: Detector, upsample: int, max_side: int | None = None,
                 reach: float | None = None, min_face: int = 0) -> list[Box]:
    """Face boxes (source pixels, may overhang the border), largest first.

    Detection runs on a copy shrunk by detection_scale (area-averaged, so no aliasing), and the
    boxes are scaled back to the source.
    """
    height, width = image.shape[:2]
    scale = detection_scale(height, width, max_side, reach, min_face)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    boxes = detector(np.ascontiguousarray(image), upsample)
    if scale < 1.0:
        boxes = [Box(round(b.left / scale), round(b.top / scale), round(b.right / scale), round(b.bottom / scale))
                 for b in boxes]
    # Stable sort: equal areas keep the detector's own (deterministic) order.
    return sorted(boxes, key=lambda box: box.width() * box.height(), reverse=True)


