"""The LiteRT classifier path (annotate.runtime=tflite): the exported graph's probabilities are the Keras
model's, with the same flip TTA and temperature, and the graph is converted once per model."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from ferray.annotate.job import resolve_model, with_lite
from ferray.config import StorageSettings, load_settings
from ferray.model import artifact, lite
from model_fixture import sample_faces

STORAGE = StorageSettings()


@pytest.fixture(scope="module")
def exported(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    cache = tmp_path_factory.mktemp("lite-cache")
    return lite.export(str(model_dir), STORAGE, "float32", cache_dir=cache), cache


def test_lite_probabilities_are_the_keras_models(model_dir: Path, exported: tuple[str, Path]) -> None:
    """Raw, and with flip TTA and a temperature: both runtimes go through artifact.apply_inference."""
    loaded = artifact.load(str(model_dir), STORAGE)
    faces, _ = sample_faces()  # the 35 bundled FER-2013 faces
    for flip, temperature in ((False, 1.0), (True, 1.5)):
        meta = {**loaded.meta, "inference": {"flip_tta": flip, "temperature": temperature}}
        expected = dataclasses.replace(loaded, meta=meta).predict(faces, batch_size=16)
        got = lite.LiteModel(exported[0], meta, STORAGE).predict(faces, batch_size=16)
        assert got.shape == expected.shape == (35, 7) and got.dtype == np.float32
        assert (got.argmax(1) == expected.argmax(1)).all()
        assert np.abs(got - expected).max() < 1e-4
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_the_graph_is_exported_once_per_model(model_dir: Path, exported: tuple[str, Path]) -> None:
    uri, cache = exported
    assert Path(uri).parent == model_dir, "written beside a writable artifact"
    before = Path(uri).stat().st_mtime_ns
    started = time.perf_counter()
    assert lite.export(str(model_dir), STORAGE, "float32", cache_dir=cache) == uri
    assert time.perf_counter() - started < 5 and Path(uri).stat().st_mtime_ns == before, "reused, not converted"
    # The driver finds it, keyed by the sha256 of model.keras; a model without one leaves it to the labeller.
    settings = load_settings(annotate={"runtime": "tflite"}).annotate
    ref = with_lite(resolve_model(str(model_dir), STORAGE), settings, STORAGE)
    assert ref.lite_uri == uri and uri.endswith(lite.lite_name(ref.sha256, "float32"))
    assert with_lite(resolve_model(str(model_dir), STORAGE), settings.model_copy(update={"runtime": "keras"}),
                     STORAGE).lite_uri is None


def test_processes_exporting_one_graph_at_once_convert_it_once(model_dir: Path, tmp_path: Path) -> None:
    """Annotate's actors start together on a machine that has never seen the model: one converts each graph,
    the others wait for its file (each conversion imports TensorFlow: seconds of CPU an actor)."""
    import subprocess
    import sys

    copy = tmp_path / "model"
    copy.mkdir()
    for name in (artifact.MODEL_FILE, artifact.META_FILE):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    code = ("import logging, sys\n"
            "from pathlib import Path\n"
            "from ferray.config import StorageSettings\n"
            "from ferray.model import lite\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "print(lite.export(sys.argv[1], StorageSettings(), 'float32', cache_dir=Path(sys.argv[2])))\n")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(copy), str(tmp_path / "cache")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in done]
    assert len({out.strip() for out, _ in done}) == 1, "both load the same file"
    assert sum("graph of" in err and "written to" in err for _, err in done) == 1, "converted once"


def test_the_shipped_model_is_cached_outside_the_package() -> None:
    folder = str(artifact.default_model_dir())
    assert lite.candidates(folder, "ab" * 32, "float32", Path("/c")) == [f"/c/{lite.lite_name('ab' * 32, 'float32')}"]


def test_an_int8_graph_must_be_exported_with_calibration_faces(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for name in (artifact.MODEL_FILE, artifact.META_FILE):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    settings = load_settings(annotate={"runtime": "tflite", "lite_precision": "int8"}).annotate
    with pytest.raises(artifact.ModelError, match="--precision int8 --calibration"):
        with_lite(resolve_model(str(copy), STORAGE), settings, STORAGE)


def test_a_fine_tuned_model_converts_in_inference_mode(tmp_path: Path) -> None:
    """A fine-tuned model keeps its head's Dropout and was trained inside a wrapper model: the graph must be
    traced with training off, or the converter meets the dropout's random ops (not LiteRT builtins)."""
    import keras

    from ferray.config import FineTuneSettings
    from ferray.training import finetune

    keras.utils.set_random_seed(0)
    features = keras.Input((48, 48, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=4)(features))
    recipe = FineTuneSettings(hidden=16, dropout=0.5, epochs=1, batch_size=35)
    model = finetune.classifier(keras.Model(features, pooled, name="backbone"), recipe)
    faces, labels = sample_faces()
    finetune.training_model(model, recipe, 1).fit(faces, keras.utils.to_categorical(labels, 7), epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)  # as export loads it
    graph = tmp_path / "model.tflite"
    graph.write_bytes(lite.convert(loaded, "float32"))
    got = lite.LiteModel(str(graph), {"inference": {"flip_tta": False}}, STORAGE).predict(faces, batch_size=16)
    np.testing.assert_allclose(got, np.asarray(loaded(faces, training=False)), atol=1e-4)


def test_calibration_faces_are_a_fixed_draw_of_the_train_split(sample_aligned: str) -> None:
    five = lite.calibration_faces(sample_aligned, STORAGE, 5)
    assert five.shape[0] == 5 and five.shape[1] == five.shape[2]
    np.testing.assert_array_equal(five, lite.calibration_faces(sample_aligned, STORAGE, 5))
    every = lite.calibration_faces(sample_aligned, STORAGE, 10_000)  # more than there are: each train face once
    assert len(every) == 21 and len(np.unique(every.reshape(len(every), -1), axis=0)) == len(every)
    with pytest.raises(artifact.ModelError, match="no ok `nosuch` faces"):
        lite.calibration_faces(sample_aligned, STORAGE, 5, split="nosuch")


def test_annotates_driver_and_detect_actors_never_import_tensorflow() -> None:
    """Resolving MODEL (and `MODEL#member_N`), choosing its LiteRT graphs and setting up a detect actor import
    neither Keras nor TensorFlow (about 4 CPU-s in every process that does)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from ferray.annotate.detect import FaceFinder\n"
            "from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite\n"
            "from ferray.config import load_settings\n"
            "settings = load_settings(annotate={'runtime': 'tflite'})\n"
            "storage = settings.storage.resolved()\n"
            "for model in ('default', 'default#member_1'):\n"
            "    ref = with_lite(resolve_model(model, storage), settings.annotate, storage)\n"
            "    faces = face_settings(settings.faces, ref)\n"
            "    FaceFinder(Job('/tmp', '', storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate)))\n"
            "loaded = [m for m in ('keras', 'tensorflow') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
