"""Calibration: expected calibration error, temperature scaling, class offsets for the minority classes, and
storing the temperature in an artifact."""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import asdict, dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve
from sklearn.metrics import f1_score, log_loss

from ferray.config import Settings
from ferray.data import io
from ferray.data.schema import LABELS
from ferray.errors import InputError
from ferray.evaluate import scoring
from ferray.model import artifact as artifacts
from ferray.model.head import apply_temperature

log = logging.getLogger(__name__)

# Search range of the temperature; outside it a model is broken rather than miscalibrated.
T_MIN, T_MAX = 0.05, 20.0
# Class offsets are searched on this grid of log-prior shifts: ±1 is a factor e on a class's odds, and a
# 0.05 step is finer than the val set can tell apart (3,589 FER-2013 PublicTest faces).
OFFSET_GRID = np.round(np.linspace(-1.0, 1.0, 41), 4)
OFFSET_SWEEPS = 3
_LABELS = list(range(len(LABELS)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (scikit-learn's log loss over the 7 classes)."""
    # float32 softmax rows sum to 1 only within rounding; renormalise so sklearn gets probabilities.
    probs = np.asarray(probs, np.float64)
    return float(log_loss(labels, probs / probs.sum(axis=1, keepdims=True), labels=_LABELS))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, offsets: Sequence[float] | None = None) -> float:
    """The temperature minimising NLL on held-out (probs, labels), after the class `offsets` the model
    applies first; 1.0 when it cannot do better.

    NLL is convex in 1/T, so a bounded scalar search over log T finds the one minimum.
    """
    if len(labels) == 0:
        raise InputError("no labelled rows to fit a temperature on")
    probs = apply_temperature(np.asarray(probs, np.float64), 1.0, offsets)

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, math.exp(log_t)), labels)

    found = minimize_scalar(loss, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                            options={"xatol": 1e-4})
    temperature = float(math.exp(found.x))
    return temperature if loss(found.x) < loss(0.0) else 1.0


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(f1_score(labels, np.asarray(probs).argmax(axis=1), labels=_LABELS, average="macro", zero_division=0))


def fit_class_offsets(probs: np.ndarray, labels: np.ndarray) -> list[float] | None:
    """Per-class shifts b of log p that maximise macro-F1 on held-out (probs, labels); None when none helps.

    Class-imbalanced training leaves the rare classes (FER-2013's disgust and fear) under-predicted even
    with class weights; a shift of their log-odds, chosen on val, trades a little of the common classes'
    recall for theirs (logit adjustment). Macro-F1 is a step function of b, so the search is coordinate
    ascent on OFFSET_GRID, a class at a time, OFFSET_SWEEPS times; a move is kept only if it raises macro-F1,
    so b stays 0 where nothing is gained. The argmax, and so accuracy, ignores the temperature applied after.
    A kept move goes to the middle of the interval of b that labels every row alike (`_centred`): the first
    grid point past a step lies within one step of it, where the rounding of another runtime or of float16
    weights would undo the gain.
    """
    if len(labels) == 0:
        raise InputError("no labelled rows to fit class offsets on")
    log_p = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    labels = np.asarray(labels)
    offsets = np.zeros(log_p.shape[1])
    best = start = macro_f1(log_p, labels)
    for _ in range(OFFSET_SWEEPS):
        moved = False
        for cls in range(len(offsets)):
            for value in OFFSET_GRID:
                trial = offsets.copy()
                trial[cls] = value
                score = macro_f1(log_p + trial, labels)
                if score > best + 1e-9:
                    trial[cls] = _centred(log_p, trial, cls)
                    best, offsets, moved = score, trial, True
        if not moved:
            break
    if best <= start:
        return None
    # A later class's move narrows an earlier one's interval: centre them all again, which labels alike.
    for _ in range(OFFSET_SWEEPS):
        for cls in np.flatnonzero(offsets):
            offsets[cls] = _centred(log_p, offsets, int(cls))
    log.info("calibration: class offsets %s raise val macro-F1 %.4f -> %.4f", np.round(offsets, 3).tolist(), start, best)
    return [float(v) for v in offsets]


def _centred(log_p: np.ndarray, offsets: np.ndarray, cls: int) -> float:
    """The middle of the interval of offsets[cls], inside OFFSET_GRID's range, over which no row's argmax
    changes: row i takes class `cls` exactly when offsets[cls] passes its best other class's shifted log p
    minus its own log p."""
    others = np.delete(log_p + offsets, cls, axis=1).max(axis=1)
    steps = others - log_p[:, cls]
    value = offsets[cls]
    below, above = steps[steps < value], steps[steps >= value]
    low = max(float(below.max()) if below.size else -np.inf, float(OFFSET_GRID[0]))
    high = min(float(above.min()) if above.size else np.inf, float(OFFSET_GRID[-1]))
    return (low + high) / 2


@dataclass(frozen=True)
class Reliability:
    """Top-label calibration: per equal-width confidence bin, rows, accuracy and mean confidence."""

    ece: float
    edges: list[float]
    counts: list[int]
    accuracy: list[float | None]  # None for an empty bin
    confidence: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> Reliability:
    """ECE = Σ_b (n_b / N) |accuracy_b − confidence_b| over the top label (Guo et al. 2017).

    scikit-learn gives the per-bin accuracy and confidence (`calibration_curve`, top-label correct
    vs confidence); it has no ECE function, so only the weighted mean is taken here, with bin counts
    from the same edges and the same `searchsorted` rule sklearn uses.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    if len(labels) == 0:
        return Reliability(float("nan"), edges.tolist(), [0] * bins, [None] * bins, [None] * bins)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.int64)
    bin_accuracy, bin_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    filled = np.flatnonzero(counts)
    ece = float(np.sum(counts[filled] / counts.sum() * np.abs(bin_accuracy - bin_confidence)))
    accuracy: list[float | None] = [None] * bins
    mean_confidence: list[float | None] = [None] * bins
    for index, acc, conf in zip(filled, bin_accuracy, bin_confidence):
        accuracy[index], mean_confidence[index] = float(acc), float(conf)
    return Reliability(ece, edges.tolist(), counts.tolist(), accuracy, mean_confidence)


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` fitted and wrote into the artifact's ferray.json."""

    model: str
    data: str
    split: str
    rows: int
    temperature: float
    previous_temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    data_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(settings: Settings, model_uri: str, val_data: str, split: str = "val") -> Calibration:
    """Fit a temperature on VAL_DATA's `split` and store it as `inference.temperature` in MODEL's ferray.json.

    Fit on held-out rows of the training dataset (its `val`), never on the test set you report.
    """
    if model_uri == artifacts.DEFAULT:
        raise artifacts.ModelError("the default model ships inside ferray; copy it to a folder to calibrate it")
    storage = settings.storage
    io.check_reachable(val_data, storage, must_exist=True)
    artifact = artifacts.load(model_uri, storage)
    rows = scoring.select(val_data, storage, artifact.meta.get("backbone", {}).get("fingerprint"), split,
                          settings.evaluate.reuse_embeddings)
    if len(rows) == 0:
        raise InputError(f"no labelled {split} rows in {val_data} to fit a temperature on "
                         f"(skipped {dict(rows.skipped)})")
    probs, _, _ = scoring.raw_probabilities(artifact, rows, settings.evaluate.batch_size)
    # The temperature comes after the artifact's class offsets, so it is fitted on what they give.
    probs = apply_temperature(probs, 1.0, artifact.meta.get("inference", {}).get("class_offsets"))
    temperature = fit_temperature(probs, rows.labels)
    scaled = apply_temperature(probs, temperature)
    bins = settings.evaluate.ece_bins
    result = Calibration(
        model=artifact.uri, data=val_data, split=rows.split, rows=len(rows), temperature=temperature,
        previous_temperature=float(artifact.meta.get("inference", {}).get("temperature", 1.0)),
        nll_before=nll(probs, rows.labels), nll_after=nll(scaled, rows.labels),
        ece_before=reliability(probs, rows.labels, bins).ece, ece_after=reliability(scaled, rows.labels, bins).ece,
        data_fingerprint=rows.fingerprint)
    meta = dict(artifact.meta)
    meta["inference"] = {**meta.get("inference", {}), "temperature": temperature}
    meta["calibration"] = {"method": "temperature", **result.to_dict(),
                           "fitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    # One atomic write: a reader sees the old ferray.json or the new one, never half of either.
    io.write_json(io.join(artifact.uri, artifacts.META_FILE), meta, storage)
    log.info("calibrate: temperature %.3f on %d %s rows; NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature,
             len(rows), rows.split, result.nll_before, result.nll_after, result.ece_before, result.ece_after)
    return result
