"""`ferray demo`: the whole job on the bundled sample, local Ray, local folders.

It runs the pipeline (ingest → align → embed → train → evaluate) on the 35 bundled FER-2013 faces,
then annotates the bundled photos and video with the shipped `default` model (or, in an install
without one, the model it just trained), and says where the report and the annotations are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ferray import pipeline
from ferray.config import DataSource, Settings
from ferray.model import artifact as artifacts

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The FER-2013 sample shipped inside the package (35 real faces, image-folder layout)."""
    return Path(str(resources.files("ferray") / "assets" / "fer2013-sample.zip"))


def media_path() -> Path:
    """A few photos and a short video of real faces, shipped inside the package."""
    return Path(str(resources.files("ferray") / "assets" / "demo-media"))


@dataclass
class DemoSummary:
    out: str
    report: str
    annotations: str
    model: str
    pipeline: dict[str, Any]
    annotate: dict[str, Any]
    stage: str = "demo"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": self.out, "report": self.report, "annotations": self.annotations,
                "model": self.model, "pipeline": self.pipeline, "annotate": self.annotate}

    def render(self) -> str:
        return (f"{pipeline.render_pipeline(self.pipeline)}\nferray demo: model used for annotation: {self.model}\n"
                f"  report:      {self.report}\n  annotations: {self.annotations}")


def demo_settings(settings: Settings, target: Path) -> Settings:
    """The user's settings with the demo's data, folders and a short training run."""
    plan = settings.pipeline.model_copy(update={
        "workdir": str(target / "run"), "evaluate": [], "backbones": [],
        "train": DataSource(dataset="fer2013", source=str(sample_path()), name="fer2013-sample")})
    # 21 training faces: a few dozen epochs of the paper's recipe are enough to show the loop.
    train = settings.train.model_copy(update={"epochs": min(settings.train.epochs, 40), "workers": 1})
    return settings.model_copy(update={"pipeline": plan, "train": train})


def run(settings: Settings, out: str) -> DemoSummary:
    from ferray import annotate

    target = Path(out).resolve()
    chosen = demo_settings(settings, target)
    ran = pipeline.run(chosen)
    row = ran.rows[0]
    report = row["reports"]["fer2013-sample"]["report"]
    shipped = artifacts.default_model_dir()
    model = artifacts.DEFAULT if (shipped / artifacts.MODEL_FILE).is_file() else row["model"]
    annotations = str(target / "annotations")
    annotated = annotate.run(chosen, model, str(media_path()), annotations)
    log.info("demo: report %s/report.md, annotations %s", report, annotations)
    return DemoSummary(out=str(target), report=f"{report}/report.md", annotations=annotations, model=model,
                       pipeline=ran.to_dict(), annotate=annotated.to_dict())
