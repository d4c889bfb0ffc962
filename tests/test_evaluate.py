"""`ferray evaluate` and calibration: both scoring paths, sklearn-checked metrics, figures, CK+ skips, temperature."""

from __future__ import annotations

import io as pyio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

from conftest import DATA, SAMPLE_ZIP
from ferray.data import ingest
from ferray.evaluate import calibration, command as evaluate, paper, scoring
from ferray.faces import stage as align
from ferray.model import embed
from ferray.data import io as fio
from ferray.model import artifact as artifacts
from ferray.cli import main
from ferray.config import Settings, StorageSettings, load_settings
from ferray.data.schema import LABELS

pytestmark = pytest.mark.usefixtures("ray_session")

STORAGE = StorageSettings()
CKPLUS48 = DATA / "ckplus48"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The bundled sample aligned and embedded (Lite0, as the model), and the CK+48 fixture aligned.

    Ten rows per shard, so some shards hold no test rows at all.
    """
    settings = load_settings(ray={"progress_bars": False}, ingest={"shard_rows": 10})
    root = tmp_path_factory.mktemp("evaluate-data")
    out = {name: str(root / name) for name in ("ingested", "aligned", "embedded", "ck-ingested", "ck-aligned")}
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), out["ingested"])
    align.run(settings, out["ingested"], out["aligned"])
    embed.run(settings, out["aligned"], out["embedded"])
    ingest.run(settings, "ckplus", str(CKPLUS48), out["ck-ingested"])
    align.run(settings, out["ck-ingested"], out["ck-aligned"])
    return out


@pytest.fixture(scope="module")
def reports(shards: dict[str, str], model_dir: Path, s3_bucket: str, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[evaluate.EvalSummary, str]]:
    """One evaluation per path: embeddings → a local folder, aligned faces → S3."""
    settings = load_settings(ray={"progress_bars": False})
    local = str(tmp_path_factory.mktemp("evaluate-report") / "embedded")
    remote = f"{s3_bucket}/reports/aligned"
    return {
        "embeddings": (evaluate.run(settings, str(model_dir), shards["embedded"], local), local),
        "faces": (evaluate.run(settings, str(model_dir), shards["aligned"], remote), remote),
    }


def _storage(uri: str) -> StorageSettings:
    return STORAGE.resolved() if uri.startswith("s3://") else STORAGE


def _metrics(out: str) -> dict[str, Any]:
    return fio.read_json(fio.join(out, evaluate.METRICS_FILE), _storage(out))


def _predictions(out: str) -> dict[str, Any]:
    return fio.read_parquet(fio.join(out, evaluate.PREDICTIONS_FILE), _storage(out)).to_pydict()


def test_both_paths_score_the_test_split_alike(reports: dict[str, tuple[evaluate.EvalSummary, str]],
                                                shards: dict[str, str]) -> None:
    fast, fast_out = reports["embeddings"]
    slow, slow_out = reports["faces"]
    assert (fast.path, slow.path) == ("embeddings", "faces")
    # The sample has 5 faces per class: 3 train, 1 val (PublicTest), 1 test (PrivateTest).
    assert fast.split == slow.split == "test" and fast.rows == slow.rows == 7
    assert fast.accuracy == slow.accuracy
    a, b = _predictions(fast_out), _predictions(slow_out)
    assert a["id"] == b["id"] and a["pred"] == b["pred"]
    np.testing.assert_allclose(np.array(a["probs"]), np.array(b["probs"]), atol=2e-3)
    metrics = _metrics(fast_out)
    assert metrics["data"]["rows_ok"] == 35 and metrics["data"]["rows_outside_split"] == 28
    assert metrics["data"]["shards"] == 4 and len(metrics["data"]["fingerprint"]) == 64
    embedded = fio.read_table(fio.completed_shards(shards["embedded"], STORAGE), STORAGE, ["backbone"])
    assert set(embedded["backbone"].to_pylist()) == {metrics["model"]["backbone"]}, "same backbone: the fast path"
    assert len(metrics["model"]["sha256"]) == 64


@pytest.mark.parametrize("path", ["embeddings", "faces"])
def test_metrics_json_agrees_with_sklearn_on_the_written_predictions(
        reports: dict[str, tuple[evaluate.EvalSummary, str]], path: str) -> None:
    _, out = reports[path]
    metrics, rows = _metrics(out), _predictions(out)
    y, pred, probs = np.array(rows["label"]), np.array(rows["pred"]), np.array(rows["probs"], np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # float32 in the file; log loss wants rows summing to one
    assert (probs.argmax(1) == pred).all() and np.allclose(probs.max(1), rows["confidence"], atol=1e-6)
    assert [LABELS[i] for i in pred] == rows["pred_name"] and [LABELS[i] for i in y] == rows["label_name"]
    assert metrics["n"] == len(y)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    present = sorted(set(y.tolist()))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    for i, name in enumerate(LABELS):
        got = metrics["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    assert metrics["confusion_matrix"]["counts"] == confusion_matrix(y, pred, labels=range(7)).tolist()
    assert metrics["calibration"]["nll"] == pytest.approx(log_loss(y, probs, labels=range(7)), rel=1e-4)
    # ECE recomputed independently: 15 equal-width bins, (lo, hi] as sklearn's calibration_curve bins.
    confidence, correct = probs.max(1), (pred == y)
    bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert metrics["calibration"]["ece"] == pytest.approx(ece, abs=1e-6)
    assert sum(metrics["calibration"]["reliability"]["counts"]) == len(y)


def test_figures_and_report(reports: dict[str, tuple[evaluate.EvalSummary, str]]) -> None:
    for _, out in reports.values():
        storage = _storage(out)
        for name, least in {"confusion_matrix.png": (600, 500), "tsne.png": (600, 500),
                            "misclassified.png": (150, 200), "reliability.png": (500, 600)}.items():
            image = Image.open(pyio.BytesIO(fio.read_bytes(fio.join(out, name), storage)))
            image.load()
            assert image.format == "PNG" and least[0] <= image.size[0] <= 4000 and least[1] <= image.size[1] <= 4000, (
                name, image.size)
            assert np.asarray(image.convert("L")).std() > 10, f"{name} is blank"
        text = fio.read_bytes(fio.join(out, "report.md"), storage).decode()
        assert "71.02%" in text and "Table 2" in text and "FER-2013 inner" in text
        for name in ("confusion_matrix.png", "tsne.png", "misclassified.png", "reliability.png"):
            assert f"]({name})" in text
        metrics = _metrics(out)
        assert metrics["paper"]["applies"] and metrics["paper"]["paper"]["accuracy"] == 71.02
        assert metrics["model"]["training_dataset"] == "fer2013"
        assert fio.exists(fio.join(out, "_ferray", "evaluate.json"), storage)


def test_ckplus_contempt_is_skipped_and_counted_through_the_cli(
        shards: dict[str, str], model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    assert main(["evaluate", str(model_dir), shards["ck-aligned"], str(out), "--log-level", "WARNING"]) == 0
    printed = capsys.readouterr().out
    assert "skipped: label_outside_7:contempt 1" in printed and "report:" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    # CK+ has no official split: every labelled row is scored, the one contempt face is not.
    assert metrics["data"]["split"] == "all" and metrics["path"] == "faces"
    assert metrics["skipped"] == {"total": 1, "by_reason": {"label_outside_7:contempt": 1}}
    assert metrics["n"] + metrics["skipped"]["total"] + metrics["data"]["rows_outside_split"] == \
        metrics["data"]["rows_ok"] == 55
    assert "neutral" not in metrics["macro_f1_labels"], "CK+48 has no neutral face to average"
    assert metrics["paper"]["applies"] is False and "fer2013 → ckplus" in metrics["paper"]["note"]
    report = (out / "report.md").read_text()
    assert "label_outside_7:contempt" in report and "78.59%" in report
    assert None not in _predictions(str(out))["label"]


def test_split_flag_and_default_rule(shards: dict[str, str], model_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(ray={"progress_bars": False}, evaluate={"split": "val", "tsne_max_rows": 10})
    summary = evaluate.run(settings, str(model_dir), shards["embedded"], str(tmp_path / "val"))
    assert summary.split == "val" and summary.rows == 7
    assert (tmp_path / "val" / "tsne.png").is_file()


def test_fit_temperature_lowers_nll_on_held_out_rows() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 7)) * 2.0
    labels = np.array([rng.choice(7, p=p) for p in softmax(logits, axis=1)])
    overconfident = softmax(logits * 3.0, axis=1)  # the true temperature is 3
    fit, held = slice(0, 2000), slice(2000, None)
    temperature = calibration.fit_temperature(overconfident[fit], labels[fit])
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = calibration.nll(overconfident[held], labels[held])
    after = calibration.nll(calibration.apply_temperature(overconfident[held], temperature), labels[held])
    assert after < before - 0.3
    ece_before = calibration.reliability(overconfident[held], labels[held]).ece
    scaled = calibration.apply_temperature(overconfident[held], temperature)
    assert calibration.reliability(scaled, labels[held]).ece < ece_before
    # Already calibrated probabilities keep T near 1.
    assert calibration.fit_temperature(softmax(logits, axis=1), labels) == pytest.approx(1.0, abs=0.1)


def test_class_offsets_give_an_under_predicted_class_back_its_recall() -> None:
    """A model that under-predicts class 2 (its log-odds pushed down by 1.2): the offsets fitted on one half
    lift that class's recall and macro-F1 on the other half; a model without the bias gains next to nothing."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6000, 7)) * 2.0
    labels = np.array([rng.choice(7, p=p) for p in softmax(logits, axis=1)])
    shy = logits.copy()
    shy[:, 2] -= 1.2
    fit, held = slice(0, 3000), slice(3000, None)
    offsets = calibration.fit_class_offsets(softmax(shy[fit], axis=1), labels[fit])
    assert offsets is not None and len(offsets) == 7
    assert offsets[2] - np.mean(offsets) > 0.5, offsets
    before, after = softmax(shy[held], axis=1), calibration.apply_temperature(softmax(shy[held], axis=1), 1.0, offsets)
    assert calibration.macro_f1(after, labels[held]) > calibration.macro_f1(before, labels[held]) + 0.01
    recall = [(p.argmax(1)[labels[held] == 2] == 2).mean() for p in (before, after)]
    assert recall[1] > recall[0] + 0.1, recall
    # Offsets move only the argmax: the temperature fitted after them still lowers NLL from there.
    temperature = calibration.fit_temperature(softmax(shy[fit], axis=1), labels[fit], offsets)
    assert calibration.nll(calibration.apply_temperature(before, temperature, offsets), labels[held]) <= \
        calibration.nll(after, labels[held]) + 1e-9
    unbiased = calibration.fit_class_offsets(softmax(logits[fit], axis=1), labels[fit])
    assert unbiased is None or np.abs(unbiased).max() < np.abs(offsets).max()


def test_class_offsets_keep_their_labels_under_another_runtimes_rounding() -> None:
    """Offsets fitted on a small val set sit in the middle of the interval that labels every row alike, not
    at the first grid point past a step: a nudge of 0.02 to one of them (float16 weights move log p by about
    0.001) relabels no row in at least 9 of 10 offsets, where the edge of the grid step did so for 4 in 10."""
    moved, kept = 0, 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(14, 7)) * 1.5
        labels = rng.integers(0, 7, size=14)
        offsets = calibration.fit_class_offsets(softmax(logits, axis=1), labels)
        if offsets is None:
            continue
        log_p = np.log(softmax(logits, axis=1))
        labelled = (log_p + offsets).argmax(axis=1)
        for cls in np.flatnonzero(offsets):
            moved += 1
            nudged = [np.add(offsets, np.eye(7)[cls] * step) for step in (-0.02, 0.02)]
            kept += all(((log_p + o).argmax(axis=1) == labelled).all() for o in nudged)
    assert moved >= 100 and kept >= 0.9 * moved, (kept, moved)


def test_calibrate_writes_the_temperature_into_the_artifact(
        shards: dict[str, str], model_dir: Path, tmp_path: Path, settings: Settings) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    result = calibration.calibrate(settings, str(copy), shards["ck-aligned"], split="all")
    meta = json.loads((copy / "ferray.json").read_text())
    assert meta["inference"]["temperature"] == result.temperature != 1.0
    assert meta["calibration"]["rows"] == 54 and meta["calibration"]["data"] == shards["ck-aligned"]
    assert result.nll_after < result.nll_before
    # The artifact now predicts the calibrated probabilities, and evaluate scores with them.
    loaded = artifacts.load(str(copy), STORAGE)
    rows = scoring.select(shards["aligned"], STORAGE, loaded.meta["backbone"]["fingerprint"], "test", False)
    raw, _, _ = scoring.raw_probabilities(loaded, rows, 64)
    faces = embed.decode_faces(rows.faces, 48, 1)
    np.testing.assert_allclose(loaded.predict(faces), calibration.apply_temperature(raw, result.temperature), atol=1e-4)
    out = tmp_path / "report"
    evaluate.run(settings, str(copy), shards["aligned"], str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inference"]["temperature"] == result.temperature and metrics["model"]["calibrated"]
    np.testing.assert_allclose(np.array(_predictions(str(out))["probs"]), loaded.predict(faces), atol=1e-4)


def test_cli_calibrate_on_fits_on_val_then_evaluates_test(
        shards: dict[str, str], model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    out = tmp_path / "report"
    assert main(["evaluate", str(copy), shards["embedded"], str(out), "--calibrate-on", shards["embedded"],
                 "--log-level", "WARNING"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fitted = json.loads((copy / "ferray.json").read_text())["calibration"]
    assert fitted["split"] == "val" and fitted["rows"] == 7
    assert metrics["calibration_fit"]["temperature"] == fitted["temperature"] == metrics["inference"]["temperature"]
    assert metrics["data"]["split"] == "test"
    assert main(["evaluate", "default", shards["embedded"], str(out), "--calibrate-on", shards["embedded"]]) == 3


def test_path_choice_and_paper_lookup() -> None:
    fp = "efficientnet-lite0-48px-c1-abc"
    assert scoring.choose_path({"embedding", "face"}, {fp}, fp, True) == "embeddings"
    assert scoring.choose_path({"embedding", "face"}, {"efficientnet-b0-48px-c1-x"}, fp, True) == "faces"
    assert scoring.choose_path({"embedding", "face"}, {fp}, fp, False) == "faces"
    with pytest.raises(ValueError, match="no aligned faces"):
        scoring.choose_path({"embedding"}, {"efficientnet-b0-48px-c1-x"}, fp, True)
    assert paper.training_dataset({"training_dataset": "RAF-DB"}) == "rafdb"
    assert paper.training_dataset({"training_data_fingerprint": "abc123"}) is None
    assert paper.training_dataset({}, override="fer2013-csv") == "fer2013"
    assert paper.comparison("rafdb", ["ckplus"], "all")["paper"]["accuracy"] == 78.59
    assert paper.comparison("rafdb", ["fer2013-csv"], "test")["paper"]["accuracy"] == 56.10
    assert paper.comparison("rafdb", ["rafdb"], "test")["paper"]["accuracy"] == 81.68
    assert "test split" in paper.comparison("fer2013", ["fer2013"], "val")["note"]
    assert paper.comparison("fer2013", ["jaffe"], "all")["applies"] is False
    assert paper.comparison(None, ["fer2013"], "test")["applies"] is False
