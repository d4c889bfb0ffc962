"""`ferray pipeline --retrain` on real FER-2013 faces: the first model is promoted, a sabotaged one rejected.

The data is `tests/data/fer2013-head.zip` (490 real faces: 40 train, 20 val, 10 test per class)
plus `tests/data/fer2013-holdout.zip` (30 more test faces per class, no duplicates of any other
FER-2013 face), unpacked into a folder that plays the watched prefix. The second run finds every
training face moved into a random OTHER class folder, as a broken labelling job would deliver it,
and `test/` untouched, so both runs are gated on the same fixed holdout: 280 test faces.

Why the reject is reliable on so little data: every training label is wrong (a permutation would
leave about 1 in 7 right), so the sabotaged head can at best stay near chance (14%; it picks its
least-trained epoch on val), while the honest head learns the classes (25-30% on these faces).
On 70 test faces that gap was 3 faces; on 280 it is a dozen times the size of one face.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ferray import cli, retrain
from ferray.data import io
from ferray.config import ConfigError, load_settings
from ferray.model.registry import Registry
from ferray.data.schema import LABELS

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # minutes: two pipelines and retrains

FACES_ZIP = Path(__file__).resolve().parent / "data" / "fer2013-head.zip"
HOLDOUT_ZIP = FACES_ZIP.with_name("fer2013-holdout.zip")
FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def unpack(target: Path) -> Path:
    for faces in (FACES_ZIP, HOLDOUT_ZIP):
        with zipfile.ZipFile(faces) as archive:
            archive.extractall(target)
    return target


def sabotage_train_labels(root: Path, seed: int = 0) -> int:
    """Move every `train/<class>/` face into a random other class folder; returns how many moved."""
    rng = np.random.default_rng(seed)
    faces = sorted((root / "train").glob("*/*.jpg"))
    for face in faces:
        others = [c for c in FOLDERS if c != face.parent.name]
        face.rename(root / "train" / others[rng.integers(len(others))] / face.name)
    return len(faces)


def write_config(tmp_path: Path, source: Path, registry: str) -> Path:
    config = tmp_path / "retrain.yaml"
    # Ten times the paper's rate learns 280 faces in a few epochs (tests/test_train.py measures it).
    config.write_text(f"""
pipeline:
  workdir: {tmp_path / "run"}
  train: {{dataset: fer2013, source: {source}, name: fer}}
train: {{epochs: 10, workers: 1, learning_rate: 0.01, batch_size: 32, decay_every: 5}}
retrain: {{registry: {registry}, metric: accuracy, tolerance: 0.0}}
evaluate: {{tsne_max_rows: 100}}
# Sorted paths put the 420 test/ faces first: shards 0-1 hold only them, 2-3 the 280 train/ faces.
ingest: {{shard_rows: 210}}
ray: {{progress_bars: false}}
""")
    return config


def test_retrain_promotes_first_then_rejects_shuffled_labels(tmp_path: Path, s3_bucket: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    source = unpack(tmp_path / "incoming")
    registry_uri = f"{s3_bucket}/retrain-{tmp_path.name}/models"
    config = write_config(tmp_path, source, registry_uri)
    registry = Registry(registry_uri, load_settings().storage.resolved())

    first = retrain.run(load_settings(config))
    assert first.promoted and first.current is None and first.reason.startswith("first model")
    assert first.holdout["split"] == "test" and first.holdout["rows"] == 280
    assert first.candidate["accuracy"] > 1 / len(LABELS), "the honest head must beat chance"
    pointer = registry.current()
    assert pointer is not None and pointer["version"] == first.version
    assert pointer["metrics"]["holdout"]["fingerprint"] == first.holdout["fingerprint"]

    markers = {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "run" / "data").rglob("_markers/*.json"))}
    assert len(markers) == 3 * 4, "ingested, aligned and embedded: four shards each"
    assert sabotage_train_labels(source) == 280
    # The scheduled job's path: the CLI, which prints one decision line.
    assert cli.main(["pipeline", "--retrain", "--config", str(config), "--log-level", "WARNING"]) == 0
    printed = capsys.readouterr().out
    assert "ferray retrain: REJECTED" in printed, printed

    summary = json.loads((tmp_path / "run" / retrain.SUMMARY_FILE).read_text())
    assert not summary["promoted"] and summary["version"] != first.version
    # The same 280 test faces, and the current model re-scored on them exactly as first measured.
    assert summary["holdout"]["fingerprint"] == first.holdout["fingerprint"]
    assert summary["current"]["version"] == first.version
    assert summary["current"]["accuracy"] == pytest.approx(first.candidate["accuracy"])
    assert summary["candidate"]["accuracy"] < summary["current"]["accuracy"]
    # Only the shards holding moved files were redone, in every stage; the holdout's shards were kept.
    redone = {p.name for p, stamp in markers.items() if p.stat().st_mtime_ns != stamp}
    kept = {p.name for p, stamp in markers.items() if p.stat().st_mtime_ns == stamp}
    assert redone == {"part-00002.json", "part-00003.json"} and kept == {"part-00000.json", "part-00001.json"}
    # The training stage really retrained on the moved files (a new run, a new artifact version).
    assert summary["pipeline"]["rows"][0]["val_accuracy"] < first.pipeline["rows"][0]["val_accuracy"]

    assert registry.current()["version"] == first.version, "a rejected candidate must not move current"
    assert registry.versions() == sorted([first.version, summary["version"]]), "every candidate is published"
    for version in registry.versions():  # the artifact and its training record, never the checkpoints
        assert set(registry.published(version)["files"]) == set(retrain.PUBLISHED_FILES)
    decisions = registry.history()
    assert [d["promote"] for d in decisions] == [True, False]
    rejected = decisions[-1]
    assert rejected["version"] == summary["version"] and rejected["previous"] == first.version
    assert rejected["metric"] == "accuracy" and rejected["tolerance"] == 0.0
    assert rejected["scores"]["current"] == pytest.approx(first.candidate["accuracy"])
    assert rejected["scores"]["candidate"] == pytest.approx(summary["candidate"]["accuracy"])
    assert rejected["holdout"]["fingerprint"] == first.holdout["fingerprint"]


def test_gate_compares_with_tolerance() -> None:
    def score(accuracy: float) -> retrain.Score:
        return retrain.Score("v", accuracy, accuracy / 2, 10, "h", "embeddings", 0.1)

    assert retrain.decide("accuracy", 0.0, score(0.5), None)[0]
    assert retrain.decide("accuracy", 0.0, score(0.5), score(0.5))[0], "as good as current is promoted"
    assert not retrain.decide("accuracy", 0.0, score(0.49), score(0.5))[0]
    assert retrain.decide("accuracy", 0.02, score(0.49), score(0.5))[0]
    promote, reason = retrain.decide("macro_f1", 0.0, score(0.4), score(0.5))
    assert not promote and reason.startswith("macro_f1 20.00% < current 25.00%")


def test_retrain_settings_refuse_what_cannot_be_gated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retrain"):
        load_settings(retrain={"holdout_split": "all"})
    with pytest.raises(ConfigError, match="pipeline.train"):
        retrain.plan(load_settings())
    train = {"dataset": "fer2013", "source": str(tmp_path)}
    with pytest.raises(ConfigError, match="one"):
        retrain.plan(load_settings(pipeline={"train": train, "backbones": ["efficientnet-b0", "efficientnet-b1"]}))
    with pytest.raises(ConfigError, match="own name"):
        retrain.plan(load_settings(pipeline={"train": train},
                                   retrain={"holdout": {"dataset": "fer2013", "source": str(tmp_path / "other")}}))
    held = {"dataset": "jaffe", "source": str(tmp_path / "jaffe")}
    chosen, holdout = retrain.plan(load_settings(pipeline={"train": train, "backbones": ["efficientnet-b0"]},
                                                 retrain={"holdout": held, "holdout_split": "all"}))
    assert holdout.label == "jaffe" and [t.label for t in chosen.pipeline.evaluate] == ["jaffe"]
    assert chosen.backbone.name == "efficientnet-b0" and chosen.pipeline.backbones == []
    assert retrain.registry_uri(chosen) == io.join(chosen.pipeline.workdir, "registry")
