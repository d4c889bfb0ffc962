"""`ferray pipeline` on the bundled sample: every stage runs once, a rerun reuses every cached stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferray import pipeline
from ferray.config import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("ray_session")


def test_pipeline_runs_end_to_end_and_reruns_from_cache(tmp_path: Path) -> None:
    from conftest import SAMPLE_ZIP

    config = tmp_path / "experiment.yaml"
    config.write_text(f"""
pipeline:
  workdir: {tmp_path / "run"}
  train: {{dataset: fer2013, source: {SAMPLE_ZIP}, name: sample}}
train: {{epochs: 5, workers: 1}}
ray: {{progress_bars: false}}
""")
    settings = load_settings(config)
    first = pipeline.run(settings)
    (row,) = first.rows
    report = Path(row["reports"]["sample"]["report"])
    assert row["reports"]["sample"]["split"] == "test" and row["reports"]["sample"]["rows"] == 7
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "tsne.png", "misclassified.png"):
        assert (report / name).is_file(), name
    assert (Path(row["model"]) / "model.keras").is_file() and (Path(row["model"]) / "ferray.json").is_file()
    assert json.loads((Path(row["model"]) / "ferray.json").read_text())["training_dataset"] == ["fer2013"]
    assert "efficientnet-lite0" in (tmp_path / "run" / "sweep.md").read_text()
    markers = sorted((tmp_path / "run").rglob("_markers/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in markers}
    second = pipeline.run(settings)
    assert second.rows[0]["reports"]["sample"]["accuracy"] == row["reports"]["sample"]["accuracy"]
    assert {p: p.stat().st_mtime_ns for p in markers} == stamps, "a rerun must not rewrite finished shards"


def test_pipeline_needs_a_training_dataset() -> None:
    with pytest.raises(ConfigError, match="pipeline.train"):
        pipeline.run(load_settings())
