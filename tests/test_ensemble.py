"""`ferray ensemble`: several real models as one artifact that evaluate, annotate and LiteRT run unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from ferray.cli import main
from ferray.config import StorageSettings, load_settings
from ferray.errors import ModelError
from ferray.evaluate.calibration import apply_temperature
from ferray.model import artifact as artifacts
from ferray.model import ensemble, lite
from ferray.model.backbones import (BackboneWeightsError, backbone_fingerprint, backbone_metadata, build_backbone,
                                    resolve_weights)
from model_fixture import build_artifact, sample_faces

STORAGE = StorageSettings()


@pytest.fixture(scope="module")
def aligned(sample_aligned: str) -> str:
    return sample_aligned


@pytest.fixture(scope="module")
def second_member(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another real model: a different head on the same sample."""
    return build_artifact(load_settings(), tmp_path_factory.mktemp("member") / "artifact", hidden=24, seed=7)


@pytest.fixture(scope="module")
def built(aligned: str, model_dir: Path, second_member: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "model"
    code = main(["ensemble", aligned, str(out), "--members", str(model_dir), str(second_member),
                 "--log-level", "WARNING"])
    assert code == 0
    return out


def test_an_ensemble_is_the_mean_of_its_members(built: Path, model_dir: Path, second_member: Path) -> None:
    faces, _ = sample_faces()
    members = [artifacts.load(str(m), STORAGE) for m in (model_dir, second_member)]
    loaded = artifacts.load(str(built), STORAGE)
    assert [m.name for m in ensemble.members(loaded.model)] == ["member_0", "member_1"]
    nested = ensemble.members(loaded.model)
    mean = np.mean([m.predict_on_batch(faces) for m in nested], axis=0)
    np.testing.assert_allclose(loaded.model.predict_on_batch(faces), mean, atol=1e-5)
    # The members are the models given, to the float16 rounding of their kernels in the file.
    for own, given in zip(nested, members):
        np.testing.assert_allclose(own.predict_on_batch(faces), given.model.predict_on_batch(faces), atol=0.03)
    inference = loaded.meta["inference"]
    mirrored = np.mean([m.predict_on_batch(faces[:, :, ::-1]) for m in nested], axis=0)
    assert inference["flip_tta"] is True and inference["temperature"] > 0
    expected = apply_temperature((mean + mirrored) / 2, inference["temperature"])
    np.testing.assert_allclose(loaded.predict(faces), expected, atol=1e-5)


def test_its_metadata_names_each_member_by_fingerprint_never_by_path(built: Path, model_dir: Path,
                                                                      second_member: Path) -> None:
    text = (built / artifacts.META_FILE).read_text()
    meta = json.loads(text)
    assert str(model_dir) not in text and str(second_member) not in text and str(built) not in text
    for described, folder in zip(meta["members"], (model_dir, second_member)):
        own = json.loads((folder / artifacts.META_FILE).read_text())
        assert described["fingerprint"] == artifacts.fingerprint(own)
        assert described["version"] == artifacts.version_of(str(folder), own)
        assert described["backbone"] == own["backbone"]["fingerprint"]
    assert meta["backbone"]["name"] == "ensemble" and len(meta["backbone"]["members"]) == 2
    assert meta["metrics"]["rows"] == {"train": 21, "val": 7, "test": 7}
    assert 0.0 <= meta["metrics"]["val_accuracy"] <= 1.0 and len(meta["metrics"]["member_scores"]) == 2
    assert meta["weights_stored_as"] == "float16"


def test_evaluate_and_litert_run_an_ensemble(built: Path, aligned: str, tmp_path: Path) -> None:
    assert main(["evaluate", str(built), aligned, str(tmp_path / "report"), "--log-level", "WARNING"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == 7 and metrics["path"] == "faces"
    faces, _ = sample_faces()
    keras_probs = artifacts.load(str(built), STORAGE).predict(faces)
    graph = lite.export(str(built), STORAGE, "float32", cache_dir=tmp_path / "cache")
    lite_probs = lite.LiteModel(graph, json.loads((built / artifacts.META_FILE).read_text()), STORAGE).predict(faces)
    np.testing.assert_allclose(lite_probs, keras_probs, atol=1e-4)


def test_float16_weights_halve_the_file_and_load_in_safe_mode(model_dir: Path, tmp_path: Path) -> None:
    source = artifacts.load(str(model_dir), STORAGE)
    wide = artifacts.save(source.model, source.meta, str(tmp_path / "wide"), STORAGE)
    narrow = artifacts.save(source.model, source.meta, str(tmp_path / "narrow"), STORAGE, weights="float16")
    assert narrow < 0.6 * wide
    loaded = keras.saving.load_model(tmp_path / "narrow" / artifacts.MODEL_FILE, compile=False, safe_mode=True)
    assert {v.dtype for v in loaded.weights} == {"float32"}
    faces, _ = sample_faces()
    narrow_probs, wide_probs = loaded.predict_on_batch(faces), source.model.predict_on_batch(faces)
    np.testing.assert_allclose(narrow_probs, wide_probs, atol=0.03)  # ~1e-3 relative rounding of every kernel
    assert (narrow_probs.argmax(1) == wide_probs.argmax(1)).mean() >= 0.9


def test_what_an_ensemble_refuses(built: Path, model_dir: Path, aligned: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ensemble", aligned, str(tmp_path / "one"), "--members", str(model_dir)]) == 3
    assert "at least two" in capsys.readouterr().err
    assert main(["ensemble", aligned, str(tmp_path / "nested"), "--members", str(model_dir), str(built)]) == 3
    assert "itself an ensemble" in capsys.readouterr().err
    assert main(["ensemble", aligned, str(tmp_path / "gone"), "--members", str(model_dir), str(tmp_path / "nope")]) == 3
    assert "no model at" in capsys.readouterr().err
    settings = load_settings(backbone={"weights": f"artifact:{built}"})
    with pytest.raises(BackboneWeightsError, match="ensemble of several backbones.*#member_N"):
        build_backbone(settings.backbone, image_size=48)
    settings = load_settings(backbone={"weights": f"artifact:{built}#member_5"})
    with pytest.raises(BackboneWeightsError, match="no member_5 .members: member_0, member_1"):
        build_backbone(settings.backbone, image_size=48)


def test_a_member_backbone_of_an_ensemble_is_reusable(built: Path) -> None:
    settings = load_settings(backbone={"weights": f"artifact:{built}#member_1"}).backbone
    ref = resolve_weights(settings)
    backbone = build_backbone(settings, weights=ref, image_size=48)
    nested = keras.saving.load_model(built / artifacts.MODEL_FILE, compile=False, safe_mode=True)
    expected = nested.get_layer("member_1").get_layer("backbone")
    faces = sample_faces()[0][:4]
    np.testing.assert_array_equal(backbone.predict(faces, verbose=0), expected.predict(faces, verbose=0))
    meta = backbone_metadata(settings, ref, image_size=48)
    ensemble_meta = json.loads((built / artifacts.META_FILE).read_text())
    assert meta["parent"]["member"] == 1
    assert meta["parent"]["fingerprint"] == ensemble_meta["backbone"]["fingerprint"]
    assert meta["weights_source"] == f"artifact:{ensemble_meta['backbone']['fingerprint']}#member_1"
    assert str(built) not in json.dumps(meta)
    # Each member is its own backbone identity, so embeddings of one are never served for the other.
    other = load_settings(backbone={"weights": f"artifact:{built}#member_0"}).backbone
    assert backbone_fingerprint(other) != backbone_fingerprint(settings)


def test_a_member_of_an_ensemble_is_a_model_of_its_own(built: Path, model_dir: Path, second_member: Path,
                                                      aligned: str, tmp_path: Path) -> None:
    faces, _ = sample_faces()
    whole = json.loads((built / artifacts.META_FILE).read_text())
    for index, folder in enumerate((model_dir, second_member)):
        given = artifacts.load(str(folder), STORAGE)
        member = artifacts.load(f"{built}#member_{index}", STORAGE)
        # Its own TTA and temperature, not the ensemble's; its name as when it stood alone.
        assert member.meta["inference"] == given.meta["inference"] and member.version == given.version
        assert member.meta["backbone"] == whole["backbone"]["members"][index] and "members" not in member.meta
        np.testing.assert_allclose(member.predict(faces), given.predict(faces), atol=0.03)
    # evaluate scores a member alone, and names it with the ensemble it was taken from.
    assert main(["evaluate", f"{built}#member_0", aligned, str(tmp_path / "member-report"), "--log-level", "WARNING"]) == 0
    metrics = json.loads((tmp_path / "member-report" / "metrics.json").read_text())
    first = artifacts.load(f"{built}#member_0", STORAGE).version
    assert metrics["model"]["uri"].endswith("#member_0")
    assert metrics["model"]["version"] == first != artifacts.version_of(str(built), whole)
    with pytest.raises(ModelError, match="has no member_2 .members: member_0, member_1"):
        artifacts.load(f"{built}#member_2", STORAGE)
    with pytest.raises(ModelError, match="no member_0 .members: none, not an ensemble"):
        artifacts.load(f"{model_dir}#member_0", STORAGE)
    # A member taken out joins a new ensemble under the fingerprint it had alone, and no path.
    out = tmp_path / "again"
    assert main(["ensemble", aligned, str(out), "--members", f"{built}#member_1", str(model_dir),
                 "--log-level", "WARNING"]) == 0
    text = (out / artifacts.META_FILE).read_text()
    assert str(built) not in text
    described = json.loads(text)["members"][0]
    assert described["fingerprint"] == artifacts.fingerprint(json.loads((second_member / artifacts.META_FILE).read_text()))


def test_annotate_labels_with_one_member_of_an_ensemble(built: Path, second_member: Path) -> None:
    """`ferray annotate MODEL#member_N`: resolved on the driver from ferray.json alone, its own LiteRT graph
    (keyed apart from the ensemble's, beside it) applied with the member's own TTA and temperature."""
    from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
    from ferray.annotate.label import Labeller

    settings = load_settings(annotate={"runtime": "tflite"})
    whole = with_lite(resolve_model(str(built), STORAGE), settings.annotate, STORAGE)
    ref = with_lite(resolve_model(f"{built}#member_1", STORAGE), settings.annotate, STORAGE)
    alone = artifacts.load(str(second_member), STORAGE)
    assert ref.version == alone.version != whole.version and ref.flip_tta == alone.meta["inference"]["flip_tta"]
    assert ref.sha256 != whole.sha256 and ref.lite_uri is None  # not exported yet
    faces = face_settings(settings.faces, ref)
    job = Job(str(built), "", STORAGE, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    model = Labeller(job).model
    assert isinstance(model, lite.LiteModel) and ref.sha256[:16] in model.uri and Path(model.uri).parent == built
    sample, _ = sample_faces()
    np.testing.assert_allclose(model.predict(sample), alone.predict(sample), atol=0.03)
    with pytest.raises(ModelError, match="has no member_5"):
        resolve_model(f"{built}#member_5", STORAGE)


def test_an_int8_choice_travels_with_the_model(aligned: str, model_dir: Path, second_member: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ferray.annotate.job import resolve_model, with_lite

    monkeypatch.setenv("FERRAY_ENSEMBLE__LITE_PRECISION", "int8")
    monkeypatch.setenv("FERRAY_ENSEMBLE__LITE_MAX_DROP", "1")  # 7 val faces: one flipped label is 14 points
    monkeypatch.setenv("FERRAY_ENSEMBLE__CALIBRATION_FACES", "16")  # of the fixture's 21 train faces
    out = tmp_path / "int8"
    assert main(["ensemble", aligned, str(out), "--members", str(model_dir), str(second_member),
                 "--log-level", "WARNING"]) == 0
    meta = json.loads((out / artifacts.META_FILE).read_text())
    assert meta["inference"]["lite_precision"] == "int8"
    checked = meta["metrics"]["lite"]
    assert len(np.load(out / lite.CALIBRATION_FILE)["faces"]) == 16
    assert checked["calibration_faces"] == 16 and 0.0 <= checked["int8"]["test_agreement"] <= 1.0
    # Only the artifact's files, on another machine: annotate's `auto` takes int8 and can export it there.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (artifacts.MODEL_FILE, artifacts.META_FILE, lite.CALIBRATION_FILE):
        (copy / name).write_bytes((out / name).read_bytes())
    annotate = load_settings(annotate={"runtime": "tflite"}).annotate
    ref = with_lite(resolve_model(str(copy), STORAGE), annotate, STORAGE)
    assert ref.lite_precision == "int8" and ref.lite_uri is None
    forced = with_lite(resolve_model(str(copy), STORAGE), annotate.model_copy(update={"lite_precision": "float32"}), STORAGE)
    assert forced.lite_precision == "float32"
    faces, _ = sample_faces()
    here = lite.LiteModel(lite.export(str(copy), STORAGE, "int8", cache_dir=tmp_path / "cache"), meta, STORAGE)
    there = lite.LiteModel(str(out / lite.lite_name(ref.sha256, "int8")), meta, STORAGE)
    np.testing.assert_allclose(here.predict(faces), there.predict(faces), atol=1e-6)


def test_a_cascade_travels_with_the_model_and_annotate_runs_it(aligned: str, built: Path, model_dir: Path,
                                                               second_member: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """`ensemble.lite_precision: cascade`: the members' graphs pass by pass, fitted on val, written into
    ferray.json with the int8 calibration faces; on a machine with only those files annotate's labeller
    gives the faces a pass is sure of that pass's estimate and the rest the whole float model's output.
    Without calibration.npz (the artifact's two files alone) `auto` labels with the whole float graph."""
    from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
    from ferray.annotate.label import Labeller
    from ferray.model import cascade

    monkeypatch.setenv("FERRAY_ENSEMBLE__LITE_PRECISION", "cascade")
    monkeypatch.setenv("FERRAY_ENSEMBLE__LITE_MAX_DROP", "0.15")  # 7 val faces: one flipped label is 14 points
    monkeypatch.setenv("FERRAY_ENSEMBLE__CALIBRATION_FACES", "16")
    out = tmp_path / "cascade"
    assert main(["ensemble", aligned, str(out), "--members", str(model_dir), str(second_member),
                 "--log-level", "WARNING"]) == 0
    meta = json.loads((out / artifacts.META_FILE).read_text())
    report = meta["metrics"]["lite"]
    assert report["calibration_faces"] == 16 and set(report["graph_ms"]) == {
        f"{ensemble.MEMBER_PREFIX}{k}:{p}" for k in (0, 1) for p in ("int8", "float32")}
    assert len(np.load(out / lite.CALIBRATION_FILE)["faces"]) == 16
    if report["precision"] == "cascade":
        assert meta["inference"]["cascade"]["passes"] == report["passes"]
        assert report["val_accuracy"] >= report["val_whole_accuracy"] - 0.15 and report["val_ms"] < report["whole_ms"]
    else:  # no order cheaper than the whole model on the fixture's few val faces
        assert "cascade" not in meta["inference"]
    # A copy of the artifact's three files and the member graphs `ferray ensemble` converted beside them (the
    # conversion on another machine is test_an_int8_choice_travels_with_the_model's), with a cascade of one
    # int8 pass: the labeller runs the graphs it finds there; a margin splitting the sample faces is then set.
    faces, _ = sample_faces()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (artifacts.MODEL_FILE, artifacts.META_FILE, lite.CALIBRATION_FILE, *(p.name for p in out.glob("*.tflite"))):
        (copy / name).write_bytes((out / name).read_bytes())
    meta["inference"]["cascade"] = cascade.Cascade((cascade.Pass(1, "int8", 0.5),)).to_dict()
    meta["inference"]["lite_precision"] = "cascade"
    (copy / artifacts.META_FILE).write_text(json.dumps(meta))
    settings = load_settings(annotate={"runtime": "tflite"})
    ref = with_lite(resolve_model(str(copy), STORAGE), settings.annotate, STORAGE)
    assert ref.lite_precision == "cascade"
    job_faces = face_settings(settings.faces, ref)
    job = Job(str(copy), "", STORAGE, job_faces, settings.annotate, ref, run_key(ref, job_faces, settings.annotate))
    model = Labeller(job).model
    assert isinstance(model, lite.CascadeModel) and model.cascade == cascade.Cascade.from_meta(meta)
    assert set(model.graphs) == {(1, "int8"), (0, "float32"), (1, "float32")}
    assert all(Path(graph.uri).parent == copy for graph in model.graphs.values())
    flip = bool(meta["inference"].get("flip_tta"))
    raw = {key: graph.member_raw(faces, flip) for key, graph in model.graphs.items()}
    estimate = cascade.prefix_estimates([(1, "int8")], raw, meta["inference"])[0]
    margin = float(np.median(cascade.margins(estimate)))
    split = lite.CascadeModel(cascade.Cascade((cascade.Pass(1, "int8", margin),)), model.graphs, meta)
    got = split.predict(faces)
    sent = cascade.margins(estimate) < margin
    assert 0 < sent.sum() < len(faces)
    # The faces sent on get the whole model: the Keras ensemble's probabilities, from the members' float graphs.
    whole = artifacts.load(str(copy), STORAGE).predict(faces)
    np.testing.assert_allclose(got[sent], whole[sent], atol=1e-4)
    np.testing.assert_allclose(got[~sent], estimate[~sent], atol=1e-6)
    # The artifact's two files alone: `auto` labels with the whole float graph and says why; asked for by name,
    # the cascade is refused on the driver.
    (copy / lite.CALIBRATION_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="ferray.annotate.job"):
        bare = with_lite(resolve_model(str(copy), STORAGE), settings.annotate, STORAGE)
    assert bare.lite_precision == "float32" and "no calibration.npz" in caplog.text
    forced = settings.annotate.model_copy(update={"lite_precision": "cascade"})
    with pytest.raises(ModelError, match="no calibration.npz"):
        with_lite(resolve_model(str(copy), STORAGE), forced, STORAGE)
    # A model that names no cascade is refused on the driver, before any actor starts.
    with pytest.raises(ModelError, match="names no cascade"):
        with_lite(resolve_model(str(built), STORAGE), forced, STORAGE)


def test_class_offsets_fitted_on_val_travel_with_the_ensemble(aligned: str, built: Path, model_dir: Path,
                                                              second_member: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ferray.evaluate.calibration import macro_f1
    from ferray.training import tune

    monkeypatch.setenv("FERRAY_ENSEMBLE__CLASS_OFFSETS", "macro_f1")
    out = tmp_path / "offsets"
    assert main(["ensemble", aligned, str(out), "--members", str(model_dir), str(second_member),
                 "--log-level", "WARNING"]) == 0
    meta = json.loads((out / artifacts.META_FILE).read_text())
    offsets = meta["inference"].get("class_offsets")
    val = tune.load_faces(aligned, STORAGE, 48, 1)[0]["val"]
    shifted = macro_f1(artifacts.load(str(out), STORAGE).predict(val.x.astype(np.float32)), val.y)
    plain = macro_f1(artifacts.load(str(built), STORAGE).predict(val.x.astype(np.float32)), val.y)
    assert shifted == pytest.approx(meta["metrics"]["val_macro_f1"], abs=1e-9)
    # Kept only when they raise val macro-F1; without them the ensemble is the one built without the option.
    assert (shifted > plain) if offsets else (shifted == plain), (offsets, shifted, plain)
    assert offsets is None or len(offsets) == 7
