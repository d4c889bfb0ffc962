"""`ferray align` on local Ray: conservation, detection on real face canvases, S3, reruns, bad rows."""

from __future__ import annotations

import io
import random
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_ZIP
from ferray import faces
from ferray.data import ingest
from ferray.faces import stage as align
from ferray.data import io as fio
from ferray.config import Settings
from test_faces import SAMPLES, canvas, load_face
from test_ingest import assert_conserved, outputs

pytestmark = pytest.mark.usefixtures("ray_session")


def with_faces(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"faces": settings.faces.model_copy(update=changes)})


def test_sample_align_is_conserved_and_rerun_skips(tmp_path: Path, settings: Settings) -> None:
    ingested, aligned = str(tmp_path / "in"), str(tmp_path / "aligned")
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), ingested)
    summary = align.run(settings, ingested, aligned)
    good, bad = assert_conserved(summary, aligned, settings.storage, 35)
    assert bad.num_rows == 0, "pre-cropped faces fall back to the full frame, never no_face"
    assert set(good["face_source"].to_pylist()) <= {"detected", "full_frame"}
    assert summary.extra["detected"] + summary.extra["full_frame"] == 35
    for row in good.to_pylist():
        face = cv2.imdecode(np.frombuffer(row["face"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert face.shape == (48, 48)
        x, y, w, h = row["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and w > 0 and h > 0
    sheet = Image.open(io.BytesIO((tmp_path / "aligned" / "contact_sheet.png").read_bytes()))
    assert sheet.size[0] >= 6 * 48
    again = align.run(settings, ingested, aligned)
    assert (again.shards_written, again.shards_skipped) == (0, 1)
    # A changed setting is a different output: the shard is rebuilt, not reused.
    rebuilt = align.run(with_faces(settings, size=64), ingested, aligned)
    assert rebuilt.shards_written == 1


def test_larger_frontal_faces_are_detected_and_levelled(tmp_path: Path, settings: Settings) -> None:
    rng = random.Random(3)
    root = tmp_path / "photos"
    for index, path in enumerate(SAMPLES * 2):
        image, _ = canvas(load_face(path), rng)
        target = root / path.parent.name / f"{index:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)
    ingested, aligned = str(tmp_path / "in"), str(tmp_path / "aligned")
    ingest.run(settings, "folder", str(root), ingested)
    strict = with_faces(settings, fallback="none")
    summary = align.run(strict, ingested, aligned)
    good, _ = assert_conserved(summary, aligned, settings.storage, len(SAMPLES) * 2)
    assert summary.extra["detected"] / summary.rows >= 0.95
    predictor = faces.load_predictor(strict.faces)
    angles = []
    for row in good.to_pylist():
        chip = faces.resize_bicubic(cv2.imdecode(np.frombuffer(row["face"], np.uint8), cv2.IMREAD_UNCHANGED), 192)
        edge = round(192 * strict.faces.padding / (1 + 2 * strict.faces.padding))
        shape = faces.predict_landmarks(chip, dlib.rectangle(edge, edge, 191 - edge, 191 - edge), predictor)
        angles.append(abs(faces.eye_line_angle(shape)))
    assert np.median(angles) <= 3.0 and np.mean(np.array(angles) <= 3.0) >= 0.9, sorted(angles)


def test_bad_rows_are_quarantined_with_reasons(tmp_path: Path, settings: Settings) -> None:
    root = tmp_path / "src" / "happy"
    root.mkdir(parents=True)
    Image.fromarray(load_face(SAMPLES[0])).save(root / "face.png")
    Image.new("L", (200, 200), 128).save(root / "blank.png")
    Image.new("L", (1, 1), 0).save(root / "tiny.png")
    Image.new("L", (9000, 5000), 0).save(root / "huge.png")  # 45 MP: within ingest's limit, over align's
    ingested, aligned = str(tmp_path / "in"), str(tmp_path / "aligned")
    ingest.run(settings, "folder", str(tmp_path / "src"), ingested)
    summary = align.run(with_faces(settings, fallback="none", upsample=2), ingested, aligned)
    _, bad = assert_conserved(summary, aligned, settings.storage, 4)
    statuses = {row["source_path"].rsplit("/", 1)[-1]: row["status"] for row in bad.to_pylist()}
    assert statuses == {"blank.png": "align:no_face", "tiny.png": "align:too_small", "huge.png": "decode:too_large"}


def test_align_reads_and_writes_s3(tmp_path: Path, settings: Settings, s3_bucket: str) -> None:
    storage = settings.storage.resolved()
    base = f"{s3_bucket}/align-{tmp_path.name}"
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), f"{base}/in")
    summary = align.run(settings, f"{base}/in", f"{base}/aligned")
    assert_conserved(summary, f"{base}/aligned", storage, 35)
    local = str(tmp_path / "aligned")
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), str(tmp_path / "in"))
    align.run(settings, str(tmp_path / "in"), local)
    assert outputs(local, storage)[0].equals(outputs(f"{base}/aligned", storage)[0])
    assert fio.exists(f"{base}/aligned/contact_sheet.png", storage)
