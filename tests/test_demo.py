"""`ferray demo`: the bundled PrivateTest sample is what it claims, and the demo's output fits on one screen."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest

from ferray import demo
from ferray.config import IngestSettings, StorageSettings
from ferray.data import io
from ferray.data.datasets import READERS

# FER-2013 PrivateTest's class counts (shared/datasets/MANIFEST.md), 3,589 faces.
PRIVATETEST = {"angry": 491, "disgust": 55, "fear": 528, "happy": 879, "sad": 594, "surprise": 416, "neutral": 626}


def test_the_bundled_sample_is_350_privatetest_faces_in_privatetest_proportions() -> None:
    path = demo.privatetest_path()
    assert path.stat().st_size <= 1_000_000
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert len(names) == len(set(names)) == 350
    assert all(n.startswith("test/") and n.split("/")[2].startswith("PrivateTest_") for n in names)
    counts = Counter(n.split("/")[1] for n in names)
    for label, full in PRIVATETEST.items():
        assert abs(counts[label] - 350 * full / 3589) < 1, label
    tree = io.Tree(str(path), StorageSettings())
    listing = READERS["fer2013"](tree, tree.files(), IngestSettings())
    assert {e.split for e in listing.entries} == {"test"} and len(listing.entries) == 350


def _summary(tmp_path: Path, train: bool) -> demo.DemoSummary:
    evaluation = {"rows": 350, "accuracy": 0.6571, "macro_f1": 0.62, "out": str(tmp_path / "evaluation")}
    annotate = {"out": str(tmp_path / "annotations"),
                "extra": {"inputs_image": 4, "inputs_video": 1, "video_seconds": 4.0, "faces": 9, "no_face": 3}}
    pictures = {"photos": "a/_overlays/  (photo_0.jpg.jpg)", "video": "a/_overlays/clip.mp4.png",
                "faces": "a/_overlays/faces.png", "timeline": "a/timelines/clip.mp4.png"}
    pipeline = {"workdir": "w", "seconds": 60.0, "rows": [{"backbone": "efficientnet-lite0", "model": "m",
                "val_accuracy": 0.3, "reports": {"fer2013-sample": {"split": "test", "rows": 7, "accuracy": 0.43,
                                                                   "macro_f1": 0.3, "report": "r"}}}]}
    return demo.DemoSummary(out=str(tmp_path), evaluation=evaluation, annotate=annotate, pictures=pictures,
                            pipeline=pipeline if train else None, seconds=61.0, paper=71.02)


def test_the_summary_fits_on_one_screen_and_names_the_reference_figures(tmp_path: Path) -> None:
    text = _summary(tmp_path, train=False).render()
    lines = text.splitlines()
    assert len(lines) <= 16 and max(len(line) for line in lines) <= 120
    assert "accuracy 65.71% (± 2.5 points" in text
    assert "full PrivateTest (3,589 faces): `default` 71.02%, the `fer` package 65.9%, the paper 71.02%" in text
    assert "faces.png" in text and "clip.mp4.png" in text
    assert len(_summary(tmp_path, train=True).render().splitlines()) <= 22


@pytest.mark.slow
def test_demo_end_to_end(ray_session: None, settings, tmp_path: Path) -> None:
    """The real demo on the bundled data: the shipped model's accuracy on the sample (the same faces score
    65.43% in docs/default-model-report's predictions of the full PrivateTest), the pictures written."""
    summary = demo.run(settings, str(tmp_path / "demo"))
    assert summary.evaluation["rows"] == 350
    assert summary.evaluation["accuracy"] == pytest.approx(229 / 350, abs=0.01)
    overlays = tmp_path / "demo" / "annotations" / "_overlays"
    assert {p.name for p in overlays.iterdir()} >= {"clip.mp4.png", "faces.png", "photo_0.jpg.jpg"}
    assert len(summary.render().splitlines()) <= 16
