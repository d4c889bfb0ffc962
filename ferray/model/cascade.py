"""A confidence cascade for annotate: one member's int8 graph labels the faces it is sure of, and only the
others go through the whole model (its float graph).

On FER-2013 an ensemble's members agree on most faces; where one member's top two probabilities are far
apart, the whole ensemble almost always gives the same label. So the cheap pass decides those faces and
the expensive one is spent on the close calls. The margin (top-1 minus top-2 probability, after the
ensemble's own class offsets and temperature) under which a face goes on is fitted on val: the smallest
share of faces sent on that keeps val accuracy within `max_drop` of the whole model's.

ferray.json records it as `inference.cascade` ({member, precision, margin}) and `inference.lite_precision:
cascade`; the member's int8 graph is calibrated on the artifact's own faces (`calibration.npz`), so any
machine exports the same graph.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ferray.model import head

log = logging.getLogger(__name__)

PRECISION = "cascade"  # what `inference.lite_precision` / `annotate.lite_precision` call it


@dataclass(frozen=True)
class Cascade:
    member: int  # which member's graph runs first (`MODEL#member_N`)
    margin: float  # faces whose first-pass margin is under this go through the whole model
    precision: str = "int8"  # the first pass's graph

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Cascade | None:
        found = meta.get("inference", {}).get("cascade")
        return cls(int(found["member"]), float(found["margin"]), str(found.get("precision", "int8"))) if found else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row."""
    if not len(probs):
        return np.zeros(0, np.float32)
    top = np.sort(probs, axis=1)
    return top[:, -1] - top[:, -2]


def first_pass(raw: np.ndarray, inference: dict[str, Any]) -> np.ndarray:
    """A member's raw probabilities under the whole model's recipe (class offsets, temperature; no TTA):
    the first pass speaks in the ensemble's calibration, so its confidences mean what the ensemble's do."""
    return head.apply_recipe(raw, {k: v for k, v in inference.items() if k != "flip_tta"}).astype(np.float32)


@dataclass(frozen=True)
class Fit:
    margin: float
    escalated: float  # share of val faces sent through the whole model
    accuracy: float  # the cascade's val accuracy
    whole_accuracy: float


def fit(first: np.ndarray, whole: np.ndarray, labels: np.ndarray, max_drop: float) -> Fit:
    """The margin that sends the fewest val faces on while val accuracy stays within `max_drop` of the
    whole model's. Faces are sent on in order of rising margin; the threshold sits halfway between the
    last face sent and the first kept, so that another runtime's rounding does not move a face across."""
    each = margins(first)
    order = np.argsort(each, kind="stable")
    sorted_margins = each[order]
    right_first = (first.argmax(1) == labels)[order].astype(np.int64)
    right_whole = (whole.argmax(1) == labels)[order].astype(np.int64)
    n = len(labels)
    # accuracy when the k lowest-margin faces go on: the whole model's right answers among them, the first
    # pass's among the rest
    right = np.concatenate([[0], np.cumsum(right_whole)]) + np.concatenate([np.cumsum(right_first[::-1])[::-1], [0]])
    whole_accuracy = float(right_whole.mean()) if n else 0.0
    within = np.flatnonzero(right / max(n, 1) >= whole_accuracy - max_drop - 1e-12)
    k = int(within[0]) if len(within) else n
    if k == 0:
        margin = 0.0
    elif k == n:
        margin = float(np.inf)
    else:
        margin = float((sorted_margins[k - 1] + sorted_margins[k]) / 2)
    return Fit(margin=margin, escalated=k / max(n, 1), accuracy=float(right[k] / max(n, 1)), whole_accuracy=whole_accuracy)


def combine(first: np.ndarray, faces: np.ndarray, whole: Callable[[np.ndarray], np.ndarray], margin: float) -> np.ndarray:
    """The first pass's probabilities, those under `margin` replaced by the whole model's on their faces."""
    out = np.array(first, np.float32, copy=True)
    sent = np.flatnonzero(margins(first) < margin)
    if len(sent):
        out[sent] = whole(faces[sent])
    return out


def choose(model_out: str, meta: dict[str, Any], faces: dict[str, Any], whole: dict[str, np.ndarray], storage: Any,
           max_drop: float, count: int) -> dict[str, Any]:
    """Fit a cascade for each member of the ensemble at MODEL_OUT (its int8 graph calibrated on `count`
    train faces stored beside the model), keep the one that sends the fewest val faces on, and say so in
    `meta` (`inference.cascade`, `inference.lite_precision`). `whole`: the whole model's probabilities on
    val and test; `faces[split]` has `.x` (raw faces) and `.y`. Returns the report for `metrics.lite`."""
    from ferray.model import lite
    from ferray.model.ensemble import MEMBER_PREFIX

    members = len(meta.get("members") or [])
    if members < 2:
        raise ValueError(f"a cascade needs an ensemble; {model_out} has {members} members")
    chosen = lite.sample_calibration(faces["train"].x, count)
    lite.save_calibration(model_out, chosen, storage)
    inference = meta.get("inference", {})
    fits: list[tuple[Fit, dict[str, np.ndarray]]] = []
    for k in range(members):
        graph = lite.LiteModel(lite.export(f"{model_out}#{MEMBER_PREFIX}{k}", storage, "int8", force=True), meta, storage, threads=2)
        first = {split: first_pass(graph.raw(faces[split].x.astype(np.float32)), inference) for split in ("val", "test")}
        fitted = fit(first["val"], whole["val"], faces["val"].y, max_drop)
        log.info("cascade: member %d first: %.1f%% of val sent on, val %.4f (whole %.4f)", k, 100 * fitted.escalated,
                 fitted.accuracy, fitted.whole_accuracy)
        fits.append((fitted, first))
    best = min(range(members), key=lambda k: fits[k][0].escalated)
    fitted, first = fits[best]
    report: dict[str, Any] = {"precision": PRECISION, "member": best, "margin": fitted.margin,
                              "calibration_faces": int(len(chosen))}
    for split in ("val", "test"):
        sent = margins(first[split]) < fitted.margin
        got = np.where(sent[:, None], whole[split], first[split])
        y = faces[split].y
        report[f"{split}_escalated"] = float(sent.mean()) if len(y) else None
        report[f"{split}_accuracy"] = float((got.argmax(1) == y).mean()) if len(y) else None
        report[f"{split}_whole_accuracy"] = float((whole[split].argmax(1) == y).mean()) if len(y) else None
        report[f"{split}_agreement"] = float((got.argmax(1) == whole[split].argmax(1)).mean()) if len(y) else None
    if fitted.escalated >= 1.0:  # nothing the first pass may decide alone: no cheaper than the whole model
        log.warning("cascade: no member decides any val face alone within %.2f points: annotate keeps float32", 100 * max_drop)
        report["precision"] = "float32"
        meta["inference"].pop("cascade", None)
    else:
        meta["inference"]["cascade"] = Cascade(best, fitted.margin).to_dict()
    meta["inference"]["lite_precision"] = report["precision"]
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m ferray.model.cascade MODEL_DIR ALIGNED [--max-drop 0.003] [--calibration-faces N]`: fit a
    cascade for an existing ensemble on ALIGNED's val (its train faces calibrate), and write it into the
    model's ferray.json and calibration.npz (model.keras untouched)."""
    import argparse

    from ferray.config import load_settings
    from ferray.data import io
    from ferray.model import artifact, lite
    from ferray.training import tune

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="an ensemble's folder (written in place)")
    parser.add_argument("aligned", help="aligned shards with train and val rows")
    parser.add_argument("--max-drop", type=float, help="val accuracy the cascade may lose (default: ensemble.lite_max_drop)")
    parser.add_argument("--calibration-faces", type=int, help="default: ensemble.calibration_faces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings()
    storage = settings.storage.resolved()
    meta = io.read_json(io.join(args.model, artifact.META_FILE), storage)
    side, channels = int(meta.get("face_size", 48)), 1 if meta.get("face_color", "gray") == "gray" else 3
    faces, _, _ = tune.load_faces(args.aligned, storage, side, channels)
    whole_graph = lite.LiteModel(lite.export(args.model, storage, "float32"), meta, storage, threads=2)
    whole = {split: whole_graph.predict(faces[split].x.astype(np.float32)) for split in ("val", "test")}
    report = choose(args.model, meta, faces, whole, storage, settings.ensemble.lite_max_drop if args.max_drop is None
                    else args.max_drop, args.calibration_faces or settings.ensemble.calibration_faces)
    meta.setdefault("metrics", {})["lite"] = report
    io.write_json(io.join(args.model, artifact.META_FILE), meta, storage)
    print(report)


if __name__ == "__main__":
    main()
