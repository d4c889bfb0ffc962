"""Several ferray models as one artifact: the face goes to every member, the output is the mean of their
probabilities (each member's own TTA is the ensemble's; the temperature is fitted on the mean).

One `model.keras` (members are nested models `member_0`, `member_1`, …) and one `ferray.json`, so every
consumer of an artifact (evaluate, annotate on Keras or LiteRT, the registry) runs an ensemble unchanged.
`ferray ensemble ALIGNED MODEL_OUT` builds one from `ensemble.members`, choosing TTA and temperature on
ALIGNED's `val` split and reporting `test`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ferray.config import Settings
from ferray.errors import InputError, ModelError
from ferray.model import artifact as artifacts
from ferray.model import cascade

log = logging.getLogger(__name__)

MEMBER_PREFIX = "member_"
MEAN_LAYER = "mean"


def members(model: Any) -> list[Any]:
    """The models whose probabilities `model` averages: its `member_*` layers, or `model` itself."""
    found = [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]
    return found or [model]


def combine(models: Sequence[Any]) -> Any:
    """One Keras model: face → each member → the mean of their probabilities."""
    import keras

    shapes = {tuple(m.input_shape[1:]) for m in models}
    if len(shapes) != 1:
        raise ModelError(f"ensemble members take different faces: {sorted(shapes)}")
    inputs = keras.Input(shape=shapes.pop(), name="face")
    outputs = []
    for index, model in enumerate(models):
        model.name = f"{MEMBER_PREFIX}{index}"
        model.trainable = False
        outputs.append(model(inputs))
    return keras.Model(inputs, keras.layers.Average(name=MEAN_LAYER)(outputs), name="ferray")


def identity(member: artifacts.Artifact) -> dict[str, Any]:
    """What names a member without its location (ferray.json keeps no machine path)."""
    meta = member.meta
    metrics = meta.get("metrics", {})
    backbone = meta.get("backbone", {})
    return {
        "version": member.version,
        "fingerprint": (meta.get("member_of") or {}).get("member_fingerprint") or artifacts.fingerprint(meta),
        "experiment": meta.get("experiment"),
        "backbone": backbone.get("fingerprint"),
        "input_size": backbone.get("input_size"),
        "parent": backbone.get("parent"),
        "inference": meta.get("inference"),
        "val_accuracy": metrics.get("val_accuracy_with_inference", metrics.get("val_accuracy")),
        "test_accuracy": metrics.get("test_accuracy"),
    }


def _check_compatible(loaded: Sequence[artifacts.Artifact]) -> None:
    for key in ("face_size", "face_color", "labels"):
        values = {json.dumps(m.meta.get(key)) for m in loaded}
        if len(values) > 1:
            raise ModelError(f"ensemble members disagree on {key}: {sorted(values)}")
    nested = [m.version for m in loaded if m.meta.get("members")]
    if nested:
        raise ModelError(f"ensemble members must be single models; {', '.join(nested)} is itself an ensemble")


@dataclass
class EnsembleResult:
    """What `ferray ensemble` did: the members, and the mean's scores with its inference recipe."""

    model_out: str
    members: list[dict[str, Any]]
    rows: dict[str, int]
    flip_tta: bool
    temperature: float
    class_offsets: list[float] | None
    val_accuracy: float | None
    test_accuracy: float | None
    val_macro_f1: float | None
    test_macro_f1: float | None
    member_scores: list[dict[str, float | None]] = field(default_factory=list)
    seconds: float = 0.0
    size_mb: float = 0.0
    lite: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        from ferray.training.runs import percent

        lines = [f"ferray ensemble: {len(self.members)} models -> {self.model_out} ({self.size_mb:.1f} MB)"]
        for member, scores in zip(self.members, self.member_scores):
            lines.append(f"  {member['version']}: val {percent(scores.get('val'))}, test {percent(scores.get('test'))}")
        offsets = f", class offsets {[round(v, 2) for v in self.class_offsets]}" if self.class_offsets else ""
        lines.append(f"  mean (flip TTA {self.flip_tta}{offsets}, T {self.temperature:.3f}): val {percent(self.val_accuracy)}, "
                     f"test {percent(self.test_accuracy)}; macro-F1 val {percent(self.val_macro_f1)}, "
                     f"test {percent(self.test_macro_f1)}")
        if self.lite and "passes" in self.lite and self.lite["precision"] != cascade.PRECISION:
            lines.append(f"  annotate's LiteRT graph: {self.lite['precision']} (no cascade cheaper than the whole "
                         f"model within ensemble.lite_max_drop of its val accuracy)")
        elif self.lite and "passes" in self.lite:  # a cascade (ferray.model.cascade)
            passes = ", ".join(f"{MEMBER_PREFIX}{p['member']} {p['precision']}" for p in self.lite["passes"])
            lines.append(f"  annotate's LiteRT graphs: {self.lite['precision']} ({passes}, then the whole model on "
                         f"{percent(self.lite['val_reached'][-1])} of val; {self.lite['val_ms']:.2f} against "
                         f"{self.lite['whole_ms']:.2f} CPU ms a face: val {percent(self.lite['val_accuracy'])}, "
                         f"test {percent(self.lite['test_accuracy'])})")
        elif self.lite:
            int8 = self.lite["int8"]
            lines.append(f"  annotate's LiteRT graph: {self.lite['precision']} (int8: val {percent(int8['val_accuracy'])}, "
                         f"test {percent(int8['test_accuracy'])}, labels as Keras's on {percent(int8['test_agreement'])} of test)")
        lines.append(f"  rows {self.rows}; {self.seconds:.0f} s")
        return "\n".join(lines)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float | None:
    return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else None


def check_int8(model_out: str, meta: dict[str, Any], faces: dict[str, Any], keras_probs: dict[str, np.ndarray],
               storage: Any, max_drop: float, count: int) -> dict[str, Any]:
    """Calibrate an int8 graph on train faces stored beside the model, score it on val and test against the
    Keras model's own probabilities, and choose it for annotate only if val loses at most `max_drop`."""
    from ferray.model import lite

    chosen = lite.store_calibration(model_out, faces["train"].x, count, storage)
    graph = lite.LiteModel(lite.export(model_out, storage, "int8"), meta, storage, threads=2)
    report: dict[str, Any] = {}
    for split in ("val", "test"):
        got = graph.predict(faces[split].x.astype(np.float32))
        report[f"{split}_accuracy"] = _accuracy(got, faces[split].y)
        report[f"{split}_keras_accuracy"] = _accuracy(keras_probs[split], faces[split].y)
        report[f"{split}_agreement"] = float((got.argmax(1) == keras_probs[split].argmax(1)).mean()) if len(got) else None
    drop = (report["val_keras_accuracy"] or 0.0) - (report["val_accuracy"] or 0.0)
    precision = "int8" if drop <= max_drop else "float32"
    if precision != "int8":
        log.warning("ensemble: the int8 graph loses %.2f points on val (at most %.2f allowed): annotate keeps float32",
                    100 * drop, 100 * max_drop)
    return {"precision": precision, "calibration_faces": int(len(chosen)), "int8": report}


def run(settings: Settings, source: str, model_out: str) -> EnsembleResult:
    """Average `ensemble.members` into one artifact at MODEL_OUT; TTA and temperature chosen on SOURCE's val."""
    from ferray.evaluate.calibration import apply_temperature, fit_class_offsets, fit_temperature
    from ferray.evaluate.command import accuracy_and_macro_f1
    from ferray.evaluate.scoring import data_fingerprint
    from ferray.data import io
    from ferray.training import tune

    options, storage = settings.ensemble, settings.storage
    if len(options.members) < 2:
        raise InputError(f"an ensemble needs at least two ensemble.members, got {options.members}")
    started = time.perf_counter()
    loaded = [artifacts.load(uri, storage) for uri in options.members]
    _check_compatible(loaded)
    side = int(loaded[0].meta.get("face_size", settings.faces.size))
    channels = 1 if loaded[0].meta.get("face_color", "gray") == "gray" else 3
    faces, _, _ = tune.load_faces(source, storage, side, channels)
    if not len(faces["val"].y):
        raise InputError(f"{source} has no labelled val rows: the ensemble's TTA and temperature are chosen on val")
    rows = {k: len(v.y) for k, v in faces.items()}
    described = [identity(m) for m in loaded]  # before the scoring below sets each temperature aside

    # Each member without TTA and with the flipped face, once: every choice below is a mean of these.
    raw: dict[str, dict[bool, np.ndarray]] = {}
    member_scores: list[dict[str, float | None]] = []
    for member in loaded:
        # Raw probabilities: the mean gets its own offsets and temperature, fitted below.
        own = {k: v for k, v in member.meta.get("inference", {}).items() if k != "class_offsets"}
        member.meta["inference"] = {**own, "temperature": 1.0}
        scores: dict[str, float | None] = {}
        for split in ("val", "test"):
            x = faces[split].x.astype(np.float32)
            plain = member.predict(x, flip_tta=False)
            mirrored = member.predict(np.ascontiguousarray(x[:, :, ::-1]), flip_tta=False)
            raw.setdefault(split, {False: np.zeros_like(plain), True: np.zeros_like(plain)})
            raw[split][False] += plain / len(loaded)
            raw[split][True] += (plain + mirrored) / (2 * len(loaded))
            own_tta = bool(member.meta["inference"].get("flip_tta"))
            scores[split] = _accuracy((plain + mirrored) / 2 if own_tta else plain, faces[split].y)
        member_scores.append(scores)
        log.info("ensemble: %s alone: val %s, test %s", member.version, scores["val"], scores["test"])
    val_y = faces["val"].y
    flip = options.flip_tta
    if flip == "auto":
        flip = (_accuracy(raw["val"][True], val_y) or 0.0) > (_accuracy(raw["val"][False], val_y) or 0.0)
    offsets = fit_class_offsets(raw["val"][flip], val_y) if options.class_offsets == "macro_f1" else None
    temperature = fit_temperature(raw["val"][flip], val_y, offsets) if options.calibrate else 1.0
    calibrated = {k: apply_temperature(raw[k][flip], temperature, offsets) for k in ("val", "test")}
    (val_acc, val_f1), (test_acc, test_f1) = (accuracy_and_macro_f1(calibrated[k], faces[k].y) for k in ("val", "test"))

    model = combine([m.model for m in loaded])
    backbone = {
        "name": "ensemble",
        "image_size": side,
        "channels": channels,
        "members": [m.meta.get("backbone", {}) for m in loaded],
        "fingerprint": "ensemble-" + hashlib.sha256(json.dumps([d["backbone"] for d in described]).encode()).hexdigest()[:16],
    }
    meta = artifacts.metadata(settings, backbone, {}, data_fingerprint(source, io.completed_shards(source, storage), storage),
                              inference={"flip_tta": bool(flip), "temperature": temperature,
                                         **({"class_offsets": offsets} if offsets else {})})
    meta["face_size"], meta["face_color"] = side, loaded[0].meta.get("face_color", "gray")
    meta["members"] = described
    meta["training_dataset"] = sorted({d for m in loaded for d in (m.meta.get("training_dataset") or [])})
    meta["licence"] = " | ".join(dict.fromkeys(str(m.meta["licence"]) for m in loaded if m.meta.get("licence"))) or None
    meta["weights_stored_as"] = options.weights
    result = EnsembleResult(
        model_out=model_out, members=described, rows=rows, flip_tta=bool(flip), temperature=round(temperature, 4),
        class_offsets=offsets,
        val_accuracy=val_acc, test_accuracy=test_acc, val_macro_f1=val_f1, test_macro_f1=test_f1,
        member_scores=member_scores, seconds=round(time.perf_counter() - started, 1))
    meta["metrics"] = {k: v for k, v in result.to_dict().items() if k not in ("model_out", "members", "seconds", "size_mb")}
    result.size_mb = round(artifacts.save(model, meta, model_out, storage, weights=options.weights) / 1e6, 2)
    if options.lite_precision in ("int8", "cascade"):
        # Its graphs are converted from the saved artifact, so ferray.json is written again with the verdict.
        if options.lite_precision == "int8":
            meta["metrics"]["lite"] = check_int8(model_out, meta, faces, calibrated, storage, options.lite_max_drop,
                                                  options.calibration_faces)
            meta["inference"]["lite_precision"] = meta["metrics"]["lite"]["precision"]
        else:
            meta["metrics"]["lite"] = cascade.choose(model_out, meta, faces, storage, options.lite_max_drop,
                                                     options.calibration_faces)
        io.write_json(io.join(model_out, artifacts.META_FILE), meta, storage)
        result.lite = meta["metrics"]["lite"]
    log.info("ensemble: %d members -> %s: val %.4f, test %s (flip TTA %s, T %.3f)", len(loaded), model_out,
             val_acc or float("nan"), test_acc, flip, temperature)
    return result
