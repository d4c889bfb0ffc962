"""Face detection and alignment with Dlib: model lookup, pure per-image functions, one Ray Data stage."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

import cv2
import dlib
import numpy as np
import pyarrow as pa
from PIL import Image

from ferray.config import FacesSettings
from ferray.errors import FerrayError
from ferray.images import DecodeError, open_checked, to_array
from ferray.schema import ALIGN_FIELDS, STATUS_OK, status

logger = logging.getLogger(__name__)

Detector: TypeAlias = "dlib.fhog_object_detector | dlib.cnn_face_detection_model_v1"
FaceSource = Literal["detected", "full_frame"]
# Turns a remote model URI (`s3://…`) into a local file; supplied by the caller so that this
# module never touches storage (ferray.io owns that).
Fetch = Callable[[str], "str | Path"]

# Files shipped by the `face-recognition-models` package, under its `models/` folder.
LANDMARK_MODEL_FILES: dict[int, str] = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
MMOD_MODEL_FILE = "mmod_human_face_detector.dat"
_MODELS_PACKAGE = "face_recognition_models"

# The smallest face Dlib's built-in HOG detector finds without upsampling (its window is 80×80 px; the
# boxes it reports are from about 73 px wide). Each upsampling step halves it.
HOG_REACH = 80

# Shorter sides cannot hold a face Dlib finds (HOG's window is 80 px, 40 px upsampled), and the
# full-frame fallback would only blow a speck up to a "face"; such images get `align:too_small`.
MIN_IMAGE_SIDE = 16
TOO_SMALL = status("align", "too_small")


def too_small(image: np.ndarray) -> str | None:
    """Why an image is too small to align, or None when it is large enough."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        return f"{width}x{height} pixels: too small to hold a face (under {MIN_IMAGE_SIDE} px a side)"
    return None


class MissingModelError(FerrayError, FileNotFoundError):
    """A Dlib model file could not be found or loaded; the message names the setting to fix."""


# --------------------------------------------------------------------------- model files


def bundled_models_dir() -> Path | None:
    """The `models/` folder of `face-recognition-models`, found without importing the package.

    Its `__init__` imports `pkg_resources`, which modern environments lack, so the package is
    located through its import spec (which does not execute it) or its installed file list.
    """
    spec = importlib.util.find_spec(_MODELS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = Path(location) / "models"
            if folder.is_dir():
                return folder
    try:
        files = importlib.metadata.files("face-recognition-models") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == LANDMARK_MODEL_FILES[5] and file.parent.name == "models":
            return Path(str(file.locate())).parent
    return None


def resolve_model(filename: str, override: str | None, setting: str, fetch: Fetch | None = None) -> Path:
    """Local path of a model: the configured override (path or URI via `fetch`), else the bundled file."""
    if override:
        if "://" in override:
            if fetch is None:
                raise MissingModelError(f"faces.{setting}={override} is remote and no fetcher was given")
            path = Path(fetch(override))
        else:
            path = Path(override).expanduser()
        if not path.is_file():
            raise MissingModelError(f"faces.{setting}: model file not found: {path}")
        return path
    folder = bundled_models_dir()
    if folder is None or not (folder / filename).is_file():
        raise MissingModelError(
            f"Dlib model {filename} not found: install face-recognition-models or set faces.{setting}"
        )
    return folder / filename


def load_detector(settings: FacesSettings, fetch: Fetch | None = None) -> Detector:
    """Build the configured detector: HOG (built into Dlib, or a custom .svm) or the MMOD CNN."""
    if settings.detector == "hog":
        if settings.detector_model is None:
            return dlib.get_frontal_face_detector()
        path = resolve_model("", settings.detector_model, "detector_model", fetch)
        return _load(dlib.fhog_object_detector, path, "detector_model")
    path = resolve_model(MMOD_MODEL_FILE, settings.detector_model, "detector_model", fetch)
    return _load(dlib.cnn_face_detection_model_v1, path, "detector_model")


def load_predictor(settings: FacesSettings, fetch: Fetch | None = None) -> dlib.shape_predictor:
    """Build the landmark predictor and check it yields the configured number of points."""
    filename = LANDMARK_MODEL_FILES[settings.landmarks]
    path = resolve_model(filename, settings.landmarks_model, "landmarks_model", fetch)
    predictor = _load(dlib.shape_predictor, path, "landmarks_model")
    # An override may be a different model; get_face_chip only understands 5- or 68-point shapes.
    parts = predictor(np.zeros((8, 8), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
    if parts != settings.landmarks:
        raise MissingModelError(
            f"faces.landmarks_model {path} predicts {parts} points, faces.landmarks={settings.landmarks}"
        )
    return predictor


def _load(factory: Callable[[str], Any], path: Path, setting: str) -> Any:
    try:
        return factory(str(path))
    except RuntimeError as error:  # Dlib's deserialisation error for a wrong or damaged file
        raise MissingModelError(f"faces.{setting}: cannot load {path}: {str(error).strip()[:200]}") from None


# --------------------------------------------------------------------------- pure functions


def detection_scale(height: int, width: int, max_side: int | None = None, reach: float | None = None,
                    min_face: int = 0) -> float:
    """How much to shrink an image before detection (1.0: not at all).

    `max_side` caps its longer side. `reach` is the smallest face the detector finds at this upsampling
    (HOG: HOG_REACH / 2**upsample); when every face wanted is at least `min_face` px wide and that is
    more than the reach, a copy where such a face is `reach` px wide finds them all, for a fraction of
    the work (HOG's cost grows with pixels).
    """
    scale = max_side / max(height, width) if max_side and max(height, width) > max_side else 1.0
    if reach and min_face > reach:
        scale = min(scale, reach / min_face)
    return scale


def detect_faces(image: np.ndarray, detector: Detector, upsample: int, max_side: int | None = None,
                 reach: float | None = None, min_face: int = 0) -> list[dlib.rectangle]:
    """Face rectangles (source pixels, may overhang the border), largest first.

    Detection runs on a copy shrunk by detection_scale (area-averaged, so no aliasing), and the
    rectangles are scaled back to the source.
    """
    height, width = image.shape[:2]
    scale = detection_scale(height, width, max_side, reach, min_face)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image)
    if isinstance(detector, dlib.cnn_face_detection_model_v1):
        rects = [found.rect for found in detector(image, upsample)]
    else:
        rects = list(detector(image, upsample))
    if scale < 1.0:
        rects = [dlib.rectangle(round(r.left() / scale), round(r.top() / scale), round(r.right() / scale),
                                round(r.bottom() / scale)) for r in rects]
    # Stable sort: equal areas keep the detector's own (deterministic) order.
    return sorted(rects, key=lambda rect: rect.width() * rect.height(), reverse=True)


def detector_reach(settings: FacesSettings) -> float | None:
    """The smallest face the configured detector finds, in source px; None when not known (a custom
    .svm detector's window, the MMOD CNN's)."""
    if settings.detector == "hog" and settings.detector_model is None:
        return HOG_REACH / 2**settings.upsample
    return None


def predict_landmarks(
    image: np.ndarray, rect: dlib.rectangle, predictor: dlib.shape_predictor
) -> dlib.full_object_detection:
    """Landmarks of the face in `rect`."""
    return predictor(np.ascontiguousarray(image), rect)


def landmark_points(shape: dlib.full_object_detection) -> np.ndarray:
    """Landmarks as an (n, 2) float array of x, y source pixels."""
    return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float32)


def eye_line_angle(landmarks: dlib.full_object_detection | np.ndarray) -> float:
    """Angle in degrees of the line between the eye centres (0 = level), from 5 or 68 points."""
    if isinstance(landmarks, dlib.full_object_detection):
        landmarks = landmark_points(landmarks)
    points = np.asarray(landmarks, np.float64)
    if len(points) == 5:  # 0-1 one eye's corners, 2-3 the other's, 4 under the nose
        first, second = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
    elif len(points) == 68:  # iBUG: 36-41 and 42-47 are the eyes
        first, second = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    else:
        raise ValueError(f"expected 5 or 68 landmarks, got {len(points)}")
    left, right = (first, second) if first[0] <= second[0] else (second, first)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def resize_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """Square bicubic resize with PIL, whose kernel widens when shrinking (no aliasing)."""
    # cv2.INTER_CUBIC samples a fixed 4x4 neighbourhood, so a 4x shrink skips pixels and aliases;
    # PIL's bicubic, like MATLAB's imresize, widens its kernel by the shrink factor.
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def align_face(
    image: np.ndarray,
    landmarks: dlib.full_object_detection,
    size: int,
    padding: float = 0.25,
    chip_scale: int = 4,
) -> np.ndarray:
    """The face rotated upright and cropped by Dlib, then resized bicubically to size×size.

    Dlib's get_face_chip resamples bilinearly; the paper resizes faces bicubically to 48×48. So the
    chip is extracted at `size * chip_scale`, near or above the source face's own resolution, and the
    one real reduction is the bicubic one. `chip_scale=1` keeps Dlib's bilinear chip as is.
    """
    chip = dlib.get_face_chip(np.ascontiguousarray(image), landmarks, size=size * chip_scale, padding=padding)
    return chip if chip_scale == 1 else resize_bicubic(chip, size)


def full_frame_face(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fallback for pre-cropped datasets: the central square of the frame, resized bicubically.

    A square crop keeps the face's proportions where stretching would distort them; pre-cropped
    datasets are square already, so for them this is the whole frame. Returns (face, bbox x, y, w, h).
    """
    height, width = image.shape[:2]
    side = min(height, width)
    x, y = (width - side) // 2, (height - side) // 2
    return resize_bicubic(np.ascontiguousarray(image[y : y + side, x : x + side]), size), (x, y, side, side)


def clip_bbox(rect: dlib.rectangle, width: int, height: int) -> tuple[int, int, int, int]:
    """A detection as (x, y, w, h) inside the image; Dlib rectangles may overhang and are inclusive."""
    x0, y0 = max(0, rect.left()), max(0, rect.top())
    x1, y1 = min(width, rect.right() + 1), min(height, rect.bottom() + 1)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


@dataclass(frozen=True)
class AlignedFace:
    """One face: its chip (size×size uint8, grey or RGB), bbox in source pixels and origin."""

    chip: np.ndarray
    bbox: tuple[int, int, int, int]
    source: FaceSource
    landmarks: np.ndarray | None = None  # (n, 2) source pixels; None for the full-frame fallback


@dataclass(frozen=True)
class AlignResult:
    """All faces aligned in one image, largest first; `faces` is empty when none and no fallback."""

    faces_found: int
    faces: tuple[AlignedFace, ...]


def align_image(
    image: np.ndarray,
    detector: Detector,
    predictor: dlib.shape_predictor,
    settings: FacesSettings,
    max_faces: int | None = None,
    detect_max_side: int | None = None,
) -> AlignResult:
    """Detect, landmark and align the faces of one decoded image, applying the fallback policy.

    `faces_found` counts every detection at least `min_face_px` wide; only the `max_faces` largest
    are aligned (the stage keeping the largest needs one; annotation needs all). `detect_max_side`
    caps the size detection sees (see detect_faces); landmarks and chips use the full image.
    """
    return align_images([image], detector, predictor, settings, max_faces, detect_max_side)[0]


def align_images(
    images: list[np.ndarray],
    detector: Detector,
    predictor: dlib.shape_predictor,
    settings: FacesSettings,
    max_faces: int | None = None,
    detect_max_side: int | None = None,
) -> list[AlignResult]:
    """align_image over several images, detecting in all of them before landmarking any.

    The same results; the order of work is for the CPU cache: the HOG filters and the landmark model
    (~9 MB of trees) each stay cached over a run of images instead of evicting each other every image
    (measured: 7.7 → 7.0 ms an image in groups of 8, 6.8 in groups of 32, on one core).
    """
    reach = detector_reach(settings)
    found = [
        [rect for rect in detect_faces(image, detector, settings.upsample, detect_max_side, reach, settings.min_face_px)
         if min(rect.width(), rect.height()) >= settings.min_face_px]
        for image in images
    ]
    results = []
    for image, rects in zip(images, found):
        height, width = image.shape[:2]
        faces = []
        for rect in rects[:max_faces]:
            shape = predict_landmarks(image, rect, predictor)
            chip = align_face(image, shape, settings.size, settings.padding, settings.chip_scale)
            faces.append(AlignedFace(chip, clip_bbox(rect, width, height), "detected", landmark_points(shape)))
        if not faces and settings.fallback == "full_frame":
            chip, bbox = full_frame_face(image, settings.size)
            faces.append(AlignedFace(chip, bbox, "full_frame"))
        results.append(AlignResult(len(rects), tuple(faces)))
    return results


def encode_png(chip: np.ndarray) -> bytes:
    """PNG bytes of a grey or RGB chip."""
    pixels = cv2.cvtColor(chip, cv2.COLOR_RGB2BGR) if chip.ndim == 3 else chip
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for a {chip.shape} chip")
    return encoded.tobytes()


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class _Row:
    """What the stage writes for one output row."""

    status: str
    error: str | None = None
    face: bytes | None = None
    bbox: list[int] | None = None
    face_source: str | None = None
    faces_found: int | None = None
    suffix: str = ""  # appended to `id` for the second and later faces under keep="all"
    passed: bool = False  # a non-ok input row: its own status and error stay as they were


class AlignStage:
    """Ray Data `map_batches` stage: adds face, bbox, face_source, faces_found to ingested rows."""

    # Resources the pipeline reads when it maps this stage (Dlib runs one thread per call).
    NUM_CPUS: ClassVar[float] = 1.0
    BATCH_SIZE: ClassVar[int] = 64

    def __init__(self, settings: FacesSettings, fetch: Fetch | None = None) -> None:
        # Runs once per actor: the models are loaded here, never on the driver or per batch.
        self.settings = settings
        self.detector = load_detector(settings, fetch)
        self.predictor = load_predictor(settings, fetch)
        logger.info(
            "align stage ready: detector=%s upsample=%d landmarks=%d",
            settings.detector,
            settings.upsample,
            settings.landmarks,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A numpy-format batch (Ray Data's, and the unit tests'); columns it does not change pass through."""
        source_rows, changed = self._changed(list(batch["status"]), list(batch["image"]), list(batch["id"]),
                                             list(batch["error"]))
        exploded = source_rows != list(range(len(batch["status"])))
        out = {name: np.take(column, source_rows, axis=0) if exploded else column for name, column in batch.items()}
        for name, values in changed.items():
            # Object arrays: Arrow reads None as null and lists of ints as list<int> (numeric dtypes cannot).
            array = np.empty(len(values), dtype=object)
            array[:] = values
            out[name] = array
        return out

    def table(self, batch: pa.Table) -> pa.Table:
        """Ingested rows in, aligned rows out; the columns it does not change stay Arrow (image bytes)."""
        source_rows, changed = self._changed(batch["status"].to_pylist(), batch["image"].to_pylist(),
                                             batch["id"].to_pylist(), batch["error"].to_pylist())
        out = batch.take(pa.array(source_rows, pa.int64())) if source_rows != list(range(batch.num_rows)) else batch
        types = {"id": pa.string(), "status": pa.string(), "error": pa.string(), **{f.name: f.type for f in ALIGN_FIELDS}}
        for name, values in changed.items():
            column = pa.array(values, types[name])
            if name in out.schema.names:
                out = out.set_column(out.schema.get_field_index(name), name, column)
            else:
                out = out.append_column(name, column)
        return out

    def _changed(self, statuses: list[Any], images: list[Any], ids: list[Any],
                 errors: list[Any]) -> tuple[list[int], dict[str, list[Any]]]:
        """Which input row each output row comes from, and the columns the stage writes (id only when exploded)."""
        source_rows: list[int] = []
        rows: list[_Row] = []
        for index, (row_status, data) in enumerate(zip(statuses, images, strict=True)):
            for row in self.align_row(row_status, data):
                source_rows.append(index)
                rows.append(row)
        changed: dict[str, list[Any]] = {
            "status": [row.status for row in rows],
            "error": [errors[i] if row.passed else row.error for i, row in zip(source_rows, rows)],
        }
        if source_rows != list(range(len(statuses))):
            changed["id"] = [f"{ids[i]}{row.suffix}" for i, row in zip(source_rows, rows)]
        for field in ALIGN_FIELDS:
            changed[field.name] = [getattr(row, field.name) for row in rows]
        return source_rows, changed

    def align_row(self, row_status: str, data: bytes | None) -> list[_Row]:
        """Output rows for one input row: one, or one per face under keep="all"."""
        if row_status != STATUS_OK:
            return [_Row(status=row_status, passed=True)]
        settings = self.settings
        try:
            opened = open_checked(data or b"", settings.max_file_bytes, settings.max_image_pixels)
            image = to_array(opened, settings.color)
        except DecodeError as error:
            return [_Row(status=error.status, error=str(error))]
        small = too_small(image)
        if small:
            return [_Row(status=TOO_SMALL, error=small)]
        max_faces = 1 if settings.keep == "largest" else None
        result = align_image(image, self.detector, self.predictor, settings, max_faces)
        if not result.faces:
            return [_Row(status=status("align", "no_face"), error="no face detected", faces_found=0)]
        return [
            _Row(
                status=STATUS_OK,
                face=encode_png(face.chip),
                bbox=list(face.bbox),
                face_source=face.source,
                faces_found=result.faces_found,
                suffix=f"#{k}" if k else "",
            )
            for k, face in enumerate(result.faces)
        ]
