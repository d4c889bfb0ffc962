"""Detection, alignment and the align stage on real FER-2013 faces (tests/data/faces), without Ray."""

from __future__ import annotations

import io
import random
from pathlib import Path

import cv2
import dlib
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ferray import faces
from ferray.config import FacesSettings, ImageLimits
from ferray.faces import AlignStage, MissingModelError
from ferray.data.schema import ALIGN_FIELDS, BBOX, FACE, FACE_SOURCE, FACES_FOUND
from ferray.data.images import decode

FACES_DIR = Path(__file__).resolve().parent / "data" / "faces"
SAMPLES = sorted(FACES_DIR.glob("*/*.jpg"))
DEFAULTS = FacesSettings()
Hog = dlib.fhog_object_detector
Predictor = dlib.shape_predictor


@pytest.fixture(scope="module")
def detector() -> Hog:
    return faces.load_detector(DEFAULTS)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return faces.load_predictor(DEFAULTS)


@pytest.fixture(scope="module")
def stage() -> AlignStage:
    return AlignStage(DEFAULTS)


def load_face(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def canvas(face: np.ndarray, rng: random.Random, angle: float = 0.0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 48×48 face upscaled 3–4× bicubically onto a larger canvas; returns it and the face's box."""
    scale = rng.choice([3.0, 3.5, 4.0])
    big = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    h, w = big.shape
    height, width = rng.randint(h + 24, 420), rng.randint(w + 24, 420)
    background = rng.choice(["flat", "gradient", "noise"])
    if background == "flat":
        image = np.full((height, width), rng.randint(0, 255), np.uint8)
    elif background == "gradient":
        ramp = np.linspace(rng.randint(0, 127), rng.randint(128, 255), width)
        image = np.tile(ramp, (height, 1)).astype(np.uint8)
    else:
        noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (height, width), dtype=np.uint8)
        image = cv2.GaussianBlur(noise, (0, 0), 3)
    y, x = rng.randint(0, height - h), rng.randint(0, width - w)
    image[y : y + h, x : x + w] = big
    if angle:
        turn = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), angle, 1.0)
        image = cv2.warpAffine(image, turn, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return image, (x, y, w, h)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def batch(rows: list[dict[str, object]]) -> dict[str, np.ndarray]:
    """A Ray Data numpy-format batch of ingested rows."""
    defaults = {"dataset": "fer2013", "split": "train", "label": 3, "label_name": "happy", "status": "ok", "error": None}
    full = [{**defaults, "id": f"r{i}", "source_path": f"train/happy/r{i}.jpg", **row} for i, row in enumerate(rows)]
    out = {}
    for name in ("id", "dataset", "split", "source_path", "label", "label_name", "image", "status", "error"):
        column = np.empty(len(full), dtype=object)
        column[:] = [row.get(name) for row in full]
        out[name] = column
    return out


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_samples_are_real_and_small() -> None:
    assert len(SAMPLES) >= 20
    assert len({path.parent.name for path in SAMPLES}) == 7
    assert sum(path.stat().st_size for path in SAMPLES) < 200_000
    assert all(load_face(path).shape == (48, 48) for path in SAMPLES)


# ---------------------------------------------------------------- models


def test_bundled_models_found_without_import() -> None:
    import sys

    folder = faces.bundled_models_dir()
    assert folder is not None and (folder / faces.LANDMARK_MODEL_FILES[5]).is_file()
    assert (folder / faces.MMOD_MODEL_FILE).is_file()
    # Importing face_recognition_models would fail on its pkg_resources import.
    assert "face_recognition_models" not in sys.modules


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="landmarks_model"):
        faces.load_predictor(FacesSettings(landmarks_model=str(tmp_path / "absent.dat")))
    with pytest.raises(MissingModelError, match="no fetcher"):
        faces.load_predictor(FacesSettings(landmarks_model="s3://bucket/models/sp5.dat"))
    damaged = tmp_path / "damaged.dat"
    damaged.write_bytes(b"not a model")
    with pytest.raises(MissingModelError, match="cannot load"):
        faces.load_predictor(FacesSettings(landmarks_model=str(damaged)))


def test_remote_model_goes_through_the_fetcher() -> None:
    bundled = faces.bundled_models_dir() / faces.LANDMARK_MODEL_FILES[5]
    asked: list[str] = []

    def fetch(uri: str) -> Path:
        asked.append(uri)
        return bundled

    faces.load_predictor(FacesSettings(landmarks_model="s3://bucket/sp5.dat"), fetch)
    assert asked == ["s3://bucket/sp5.dat"]


def test_landmark_count_must_match_the_model() -> None:
    sixty_eight = faces.bundled_models_dir() / faces.LANDMARK_MODEL_FILES[68]
    with pytest.raises(MissingModelError, match="68 points"):
        faces.load_predictor(FacesSettings(landmarks=5, landmarks_model=str(sixty_eight)))


def test_mmod_detector_finds_a_face() -> None:
    image, _ = canvas(load_face(SAMPLES[0]), random.Random(3))
    mmod = faces.load_detector(FacesSettings(detector="mmod"))
    assert len(faces.detect_faces(image, mmod, 0)) == 1


# ---------------------------------------------------------------- detection and alignment


def test_detection_rate_on_canvases(detector: Hog, predictor: Predictor) -> None:
    rng = random.Random(0)
    found = 0
    total = 0
    for path in SAMPLES:
        for _ in range(2):
            image, (x, y, w, h) = canvas(load_face(path), rng)
            result = faces.align_image(image, detector, predictor, DEFAULTS, max_faces=1)
            total += 1
            if result.faces_found == 0:
                assert result.faces[0].source == "full_frame"
                continue
            found += 1
            face = result.faces[0]
            bx, by, bw, bh = face.bbox
            assert face.source == "detected" and face.chip.shape == (48, 48)
            assert 0 <= bx and 0 <= by and bx + bw <= image.shape[1] and by + bh <= image.shape[0]
            # The box is on the pasted face, not elsewhere on the canvas.
            assert x <= bx + bw / 2 <= x + w and y <= by + bh / 2 <= y + h
    assert found / total >= 0.95, f"detected {found}/{total}"


def test_alignment_levels_the_eyes(detector: Hog, predictor: Predictor) -> None:
    """Faces turned ±12° come out with level eyes, re-measured by the 5-point predictor.

    Dlib fits a similarity transform to all five points (eyes and nose), so a turned head leaves a
    few faces a few degrees off; the median is the alignment's accuracy.
    """
    rng = random.Random(1)
    before, after = [], []
    for path in SAMPLES:
        image, _ = canvas(load_face(path), rng, angle=rng.choice([-12.0, 12.0]))
        result = faces.align_image(image, detector, predictor, DEFAULTS, max_faces=1)
        if result.faces_found == 0:
            continue
        before.append(abs(faces.eye_line_angle(result.faces[0].landmarks)))
        # Re-measure on the chip enlarged, in the face box get_face_chip puts at [p, 1+p]/(1+2p).
        chip = faces.resize_bicubic(result.faces[0].chip, 192)
        edge = round(192 * DEFAULTS.padding / (1 + 2 * DEFAULTS.padding))
        shape = faces.predict_landmarks(chip, dlib.rectangle(edge, edge, 191 - edge, 191 - edge), predictor)
        after.append(abs(faces.eye_line_angle(shape)))
    assert len(after) >= 18
    assert np.median(before) > 8
    assert np.median(after) <= 1.5
    assert np.mean(np.array(after) <= 3.0) >= 0.85, sorted(after)
    assert max(after) <= 8.0


def test_eye_line_angle_of_known_points() -> None:
    level = np.array([[70, 40], [60, 40], [20, 40], [30, 40], [45, 70]], np.float32)
    assert faces.eye_line_angle(level) == pytest.approx(0.0)
    tilted = np.array([[70, 50], [60, 50], [20, 40], [30, 40], [45, 70]], np.float32)
    assert faces.eye_line_angle(tilted) == pytest.approx(np.degrees(np.arctan2(10, 40)))
    with pytest.raises(ValueError):
        faces.eye_line_angle(np.zeros((3, 2)))


def test_raw_fer_face_at_upsample_0_falls_back_to_full_frame(detector: Hog, predictor: Predictor) -> None:
    face = load_face(SAMPLES[0])
    result = faces.align_image(face, detector, predictor, FacesSettings(upsample=0))
    assert result.faces_found == 0
    (only,) = result.faces
    assert only.source == "full_frame" and only.bbox == (0, 0, 48, 48)
    np.testing.assert_array_equal(only.chip, face)


def test_full_frame_takes_the_central_square() -> None:
    frame = np.arange(40 * 60, dtype=np.uint32).reshape(40, 60).astype(np.uint8)
    chip, bbox = faces.full_frame_face(frame, 20)
    assert bbox == (10, 0, 40, 40) and chip.shape == (20, 20)


@pytest.mark.parametrize(
    ("color", "size", "shape"), [("gray", 48, (48, 48)), ("rgb", 48, (48, 48, 3)), ("gray", 64, (64, 64))]
)
def test_output_size_and_colour(color: str, size: int, shape: tuple[int, ...]) -> None:
    image, _ = canvas(load_face(SAMPLES[1]), random.Random(5))
    stage = AlignStage(FacesSettings(color=color, size=size))
    out = stage(batch([{"image": encode(Image.fromarray(image).convert("RGB"))}]))
    assert out["status"][0] == "ok" and out[FACE_SOURCE][0] == "detected"
    assert decode_png(out[FACE][0]).shape == shape


def test_bbox_clipped_to_a_face_at_the_border(detector: Hog, predictor: Predictor) -> None:
    big = cv2.resize(load_face(SAMPLES[2]), None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    image = np.full((260, 300), 128, np.uint8)
    image[-180:, -180:] = big[:180, :180]  # the face's right and bottom edge cut off by the frame
    result = faces.align_image(image, detector, predictor, DEFAULTS)
    for face in result.faces:
        x, y, w, h = face.bbox
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 300 and y + h <= 260


def test_keep_all_emits_one_row_per_face_largest_first() -> None:
    rng = random.Random(7)
    small = cv2.resize(load_face(SAMPLES[3]), None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    large = cv2.resize(load_face(SAMPLES[4]), None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    image = np.full((240, 420), rng.randint(90, 160), np.uint8)
    image[40:184, 10:154] = small
    image[20:212, 200:392] = large
    stage = AlignStage(FacesSettings(keep="all"))
    out = stage(batch([{"image": encode(Image.fromarray(image))}, {"image": b"", "status": "ok"}]))
    assert list(out["id"]) == ["r0", "r0#1", "r1"]
    assert list(out[FACES_FOUND]) == [2, 2, None]
    assert out[BBOX][0][2] > out[BBOX][1][2] and out[BBOX][0][0] >= 200
    assert out["source_path"][1] == "train/happy/r0.jpg" and out["status"][2] == "decode:empty"


# ---------------------------------------------------------------- decoding through the stage


def _modes() -> dict[str, bytes]:
    image, _ = canvas(load_face(SAMPLES[5]), random.Random(11))
    grey = Image.fromarray(image)
    rgba = grey.convert("RGBA")
    rgba.putalpha(255)
    sixteen = Image.fromarray(image.astype(np.uint16) * 257)
    # Stored sideways, shown upright: orientation 6 tells a viewer to turn it 90° clockwise.
    sideways = grey.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "RGBA": encode(rgba),
        "P": encode(grey.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)),
        "I;16": encode(sixteen),
        "CMYK": encode(grey.convert("CMYK"), "JPEG", quality=95),
        "EXIF-rotated": encode(sideways, "JPEG", quality=95, exif=exif),
    }


MODES = _modes()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_any_mode_is_normalised_and_aligned(stage: AlignStage, mode: str) -> None:
    out = stage(batch([{"image": MODES[mode]}]))
    assert out["status"][0] == "ok", out["error"][0]
    assert out[FACE_SOURCE][0] == "detected" and out[FACES_FOUND][0] == 1
    assert decode_png(out[FACE][0]).shape == (48, 48)


def test_mode_fixtures_are_what_they_claim() -> None:
    assert Image.open(io.BytesIO(MODES["I;16"])).mode.startswith("I")
    assert Image.open(io.BytesIO(MODES["CMYK"])).mode == "CMYK"
    assert Image.open(io.BytesIO(MODES["P"])).mode == "P"


def test_a_colour_jpeg_decodes_to_the_grey_its_colours_give() -> None:
    """Grey JPEGs are decoded from their luma alone; that grey is the one RGB → L gives, to rounding."""
    image, _ = canvas(load_face(SAMPLES[3]), random.Random(5))
    warm = np.stack([image, (image * 0.8).astype(np.uint8), (image * 0.55 + 40).astype(np.uint8)], axis=-1)
    data = encode(Image.fromarray(warm), "JPEG", quality=90)
    grey, rgb = decode(data, ImageLimits(), "gray"), decode(data, ImageLimits(), "rgb")
    assert grey.shape == rgb.shape[:2] and rgb.shape[2] == 3
    via_rgb = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.int16)
    assert np.abs(grey.astype(np.int16) - via_rgb).mean() < 0.5


def _truncated() -> bytes:
    data = (FACES_DIR / SAMPLES[0].relative_to(FACES_DIR)).read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", "decode:empty"), (_truncated(), "decode:truncated"), (b"\x00junk" * 40, "decode:not_image")],
    ids=["zero-byte", "truncated", "garbage"],
)
def test_undecodable_bytes_become_a_decode_status(stage: AlignStage, data: bytes, expected: str) -> None:
    out = stage(batch([{"image": data}]))
    assert out["status"][0] == expected and out["error"][0]
    assert out[FACE][0] is None and out[BBOX][0] is None and out[FACES_FOUND][0] is None


def test_oversized_image_refused_before_decoding() -> None:
    image, _ = canvas(load_face(SAMPLES[0]), random.Random(2))
    out = AlignStage(FacesSettings(limits=ImageLimits(max_image_pixels=1000)))(batch([{"image": encode(Image.fromarray(image))}]))
    assert out["status"][0] == "decode:too_large"


def test_blank_image_without_fallback_is_no_face() -> None:
    blank = encode(Image.new("L", (200, 160), 200))
    out = AlignStage(FacesSettings(fallback="none"))(batch([{"image": blank}]))
    assert out["status"][0] == "align:no_face" and out["error"][0]
    assert out[FACES_FOUND][0] == 0 and out[FACE][0] is None


def test_three_row_batch(stage: AlignStage) -> None:
    image, _ = canvas(load_face(SAMPLES[6]), random.Random(4))
    rows = [
        {"image": encode(Image.fromarray(image), "JPEG", quality=90)},
        {"image": None, "status": "decode:corrupt", "error": "bad huffman table", "label": None},
        {"image": SAMPLES[7].read_bytes()},  # a raw 48×48 FER face: found at upsample 1 or framed whole
    ]
    given = batch(rows)
    out = stage(given)
    assert list(out["id"]) == ["r0", "r1", "r2"]
    assert list(out["status"]) == ["ok", "decode:corrupt", "ok"]
    assert list(out["error"]) == [None, "bad huffman table", None]
    # The non-ok row passes through untouched, its new columns null.
    assert out["image"][1] is None and out["label"][1] is None
    assert [out[name][1] for name in (FACE, BBOX, FACE_SOURCE, FACES_FOUND)] == [None] * 4
    assert out[FACE_SOURCE][0] == "detected" and out[FACE_SOURCE][2] in ("detected", "full_frame")
    assert all(out[name] is given[name] for name in ("dataset", "split", "label", "label_name", "image"))
    # The new columns convert to the Arrow types a sink writes.
    for field in ALIGN_FIELDS:
        assert pa.array(list(out[field.name]), type=field.type).null_count == 1
