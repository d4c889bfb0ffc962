"""The model artifact: one safe-mode `model.keras` plus `ferray.json`, loadable from folders, S3 and registries."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferray.model import artifact
from ferray.config import StorageSettings
from ferray.model.registry import Registry
from model_fixture import sample_faces

STORAGE = StorageSettings()


def test_artifact_predicts_raw_faces_from_a_fresh_load(model_dir: Path) -> None:
    loaded = artifact.load(str(model_dir), STORAGE)
    faces, labels = sample_faces()
    probs = loaded.predict(faces)
    assert probs.shape == (35, 7) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    accuracy = float((probs.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(loaded.meta["metrics"]["sample_train_accuracy"], abs=1e-6)
    assert accuracy > 0.5, "the head was fitted on these faces; chance is 1/7"
    meta = json.loads((model_dir / "ferray.json").read_text())
    for key in ("labels", "backbone", "weights_source", "weights_sha256", "training_data_fingerprint", "metrics",
                "ferray_version", "created_at"):
        assert meta[key] is not None


def test_flip_tta_and_temperature_from_metadata(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "ferray.json").read_text())
    meta["inference"] = {"flip_tta": True, "temperature": 2.0}
    (copy / "ferray.json").write_text(json.dumps(meta))
    faces, _ = sample_faces()
    plain = artifact.load(str(model_dir), STORAGE).predict(faces)
    tuned = artifact.load(str(copy), STORAGE).predict(faces)
    assert np.allclose(tuned.sum(1), 1.0, atol=1e-4)
    assert tuned.max(1).mean() < plain.max(1).mean(), "temperature 2 must soften the probabilities"

    # A caller's flip_tta overrides the artifact's: one pass with its temperature, or TTA on a plain model.
    from ferray.evaluate.calibration import apply_temperature

    model = artifact.load(str(model_dir), STORAGE)
    assert np.allclose(artifact.load(str(copy), STORAGE).predict(faces, flip_tta=False), apply_temperature(plain, 2.0),
                       atol=1e-5)
    flipped = model.predict(np.ascontiguousarray(faces[:, :, ::-1]))
    assert not np.allclose(flipped, plain, atol=1e-3), "mirrored faces must score differently for this to test TTA"
    assert np.allclose(model.predict(faces, flip_tta=True), (plain + flipped) / 2, atol=1e-5)


def test_class_offsets_from_metadata_shift_every_runtime_alike(model_dir: Path, tmp_path: Path) -> None:
    """`inference.class_offsets` is part of the recipe: Keras and LiteRT apply it the same way."""
    from ferray.model import lite
    from ferray.model.head import apply_temperature

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "ferray.json").read_text())
    offsets = [0.0, 9.0, 0.0, -4.0, 0.0, 0.0, 2.0]  # the fixture model is sure of itself: large shifts
    meta["inference"] = {"flip_tta": False, "temperature": 1.5, "class_offsets": offsets}
    (copy / "ferray.json").write_text(json.dumps(meta))
    faces, _ = sample_faces()
    plain = artifact.load(str(model_dir), STORAGE).predict(faces, flip_tta=False)
    shifted = artifact.load(str(copy), STORAGE)
    expected = apply_temperature(plain, 1.5, offsets)
    np.testing.assert_allclose(shifted.predict(faces), expected, atol=1e-5)
    assert (expected.argmax(1) != plain.argmax(1)).any(), "offsets this large must change some labels"
    graph = lite.LiteModel(lite.export(str(copy), STORAGE, "float32", cache_dir=tmp_path / "cache"), shifted.meta,
                           STORAGE)
    np.testing.assert_allclose(graph.predict(faces), expected, atol=1e-4)


def test_s3_and_registry_uris(model_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    storage = StorageSettings().resolved()
    registry = Registry(f"{s3_bucket}/registry-{tmp_path.name}/models", storage)
    version = registry.publish(str(model_dir))
    registry.promote(version, {"promote": True, "metric": "test"})
    loaded = artifact.load(f"{s3_bucket}/registry-{tmp_path.name}/models", storage)
    faces, _ = sample_faces()
    assert np.allclose(loaded.predict(faces[:4]), artifact.load(str(model_dir), STORAGE).predict(faces[:4]), atol=1e-5)


def test_refusals_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(artifact.ModelError, match="no model at"):
        artifact.load(str(tmp_path / "nothing"), STORAGE)
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    meta = json.loads((wrong / "ferray.json").read_text())
    meta["labels"] = ["happy", "sad"]
    (wrong / "ferray.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ModelError, match="labels"):
        artifact.load(str(wrong), STORAGE)


def test_a_lambda_layer_is_refused_by_safe_mode(tmp_path: Path, model_dir: Path) -> None:
    import keras

    inputs = keras.Input((48, 48, 1))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    folder = tmp_path / "unsafe"
    folder.mkdir()
    unsafe.save(folder / "model.keras")
    shutil.copy(model_dir / "ferray.json", folder / "ferray.json")
    with pytest.raises(artifact.ModelError, match="safe mode"):
        artifact.load(str(folder), STORAGE)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_versions_are_names_and_fingerprints_never_times_or_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from ferray.cli import main

    meta = json.loads((artifact.default_model_dir() / artifact.META_FILE).read_text())
    version = artifact.default_version()
    assert re.fullmatch(r"default-[0-9a-f]{12}", version), version
    assert artifact.Artifact(str(artifact.default_model_dir()), None, meta).version == version
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and version in capsys.readouterr().out
    # A new temperature is a new model; a name the artifact gives itself wins; the folder names the rest.
    calibrated = {**meta, "inference": {**meta["inference"], "temperature": 2.0}}
    assert artifact.version_of("default", calibrated) != version
    assert artifact.version_of("s3://b/models/20261128T093324Z-c89080e6", {**meta, "version": "v7"}) == "v7"
    assert artifact.version_of("s3://b/models/m1/model.keras", meta).startswith("m1-")
    assert artifact.public_uri(str(artifact.default_model_dir())) == "default"
    # The shipped metadata names where its weights came from by fingerprint, never by a machine's path.
    paths = [s for s in _strings(meta) if re.search(r"(^|[\s:])/(tmp|home|root|work|Users)/", s)]
    assert not paths, paths
