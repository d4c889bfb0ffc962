"""`ferray evaluate`: a model's metrics on labelled shards of any dataset, with the paper's figures and a report."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

from ferray import __version__
from ferray.config import Settings, StorageSettings
from ferray.data import io
from ferray.data.schema import LABELS
from ferray.errors import InputError
from ferray.evaluate import paper, report, scoring
from ferray.evaluate.calibration import calibrate, reliability
from ferray.model import artifact as artifacts
from ferray.model.head import apply_recipe

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
REPORT_FILE = "report.md"
FIGURES = ("confusion_matrix.png", "tsne.png", "misclassified.png", "reliability.png")
_INDICES = list(range(len(LABELS)))

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("split", pa.string()),
    pa.field("label", pa.int8()),
    pa.field("label_name", pa.string()),
    pa.field("pred", pa.int8()),
    pa.field("pred_name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("probs", pa.list_(pa.float32(), len(LABELS))),
    pa.field("correct", pa.bool_()),
])


@dataclass
class EvalSummary:
    """What an evaluation found, for the one-screen summary and `_ferray/evaluate.json`."""

    source: str
    out: str
    model: str
    split: str
    path: str
    rows: int
    accuracy: float
    macro_f1: float
    ece: float
    skipped: dict[str, int]
    paper: dict[str, Any] | None
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    stage: str = "evaluate"
    by_status: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The one-screen summary the command line prints."""
        lines = [f"ferray evaluate: {self.model} on {self.source} -> {self.out}"]
        lines.append(f"  split {self.split} ({self.path} path): {self.rows} rows   accuracy "
                     f"{100 * self.accuracy:.2f}%   macro-F1 {100 * self.macro_f1:.2f}%   ECE {self.ece:.3f}   "
                     f"time: {self.seconds:.1f} s")
        paper = self.paper or {}
        if paper.get("applies"):
            lines.append(f"  paper: {paper['paper']['accuracy']:.2f}% ({paper['paper']['where']})")
        elif paper.get("note"):
            lines.append(f"  paper: {paper['note']}")
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.calibration:
            fit = self.calibration
            lines.append(f"  calibrated: temperature {fit['temperature']:.3f} on {fit['rows']} {fit['split']} rows of {fit['data']}")
        lines.append(f"  report: {self.out.rstrip('/')}/report.md")
        return "\n".join(lines)


def accuracy_and_macro_f1(probs: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """A training run's two headline scores of calibrated probabilities (None, None without rows)."""
    if len(labels) == 0:
        return None, None
    metrics = classification_metrics(labels, probs, bins=10)
    return metrics["accuracy"], metrics["macro_f1"]


def classification_metrics(labels: np.ndarray, probs: np.ndarray, bins: int) -> dict[str, Any]:
    """Every number of metrics.json that depends on predictions, from scikit-learn."""
    preds = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=_INDICES, zero_division=0)
    # Macro-F1 over the classes the data has: CK+ has no `neutral`, and a class with no rows has
    # no recall to average.
    present = sorted(set(labels.tolist()))
    counts = confusion_matrix(labels, preds, labels=_INDICES)
    curve = reliability(probs, labels, bins)
    with warnings.catch_warnings():
        # Cross-dataset, the model may predict a class the data lacks (CK+ has no neutral): expected.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, preds))
    return {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=present, average="macro", zero_division=0)),
        "macro_f1_labels": [LABELS[i] for i in present],
        "weighted_f1": float(f1_score(labels, preds, labels=present, average="weighted", zero_division=0)),
        "balanced_accuracy": balanced,
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(LABELS, precision, recall, f1, support)},
        "confusion_matrix": {"labels": list(LABELS), "rows": "true", "columns": "predicted",
                             "counts": counts.tolist(), "wrong": int(len(labels) - np.trace(counts))},
        "calibration": {"ece": curve.ece, "bins": bins, "nll": float(log_loss(labels, probs, labels=_INDICES)),
                        "reliability": curve.to_dict()},
    }


def predictions_table(rows: scoring.Rows, probs: np.ndarray) -> pa.Table:
    preds = probs.argmax(axis=1)
    return pa.table({
        "id": rows.ids,
        "dataset": rows.datasets,
        "split": rows.splits,
        "label": rows.labels.astype(np.int8),
        "label_name": [LABELS[i] for i in rows.labels],
        "pred": preds.astype(np.int8),
        "pred_name": [LABELS[i] for i in preds],
        "confidence": probs.max(axis=1).astype(np.float32),
        "probs": [p.astype(np.float32) for p in probs],
        "correct": preds == rows.labels,
    }, schema=PREDICTIONS_SCHEMA)


def _model_identity(artifact: artifacts.Artifact, training: str | None, storage: StorageSettings) -> dict[str, Any]:
    from ferray.model.names import file_sha256, split_member

    meta = artifact.meta
    folder, _ = split_member(artifact.uri)  # `MODEL#member_N`: the ensemble's file, named with the member
    local = io.fetch_cached(io.join(folder, artifacts.MODEL_FILE), storage)
    return {
        "uri": artifacts.public_uri(artifact.uri),
        "version": artifact.version,
        "sha256": file_sha256(local),
        "backbone": meta.get("backbone", {}).get("fingerprint"),
        "backbone_name": meta.get("backbone", {}).get("name"),
        "training_data_fingerprint": meta.get("training_data_fingerprint"),
        "training_dataset": training,
        "created_at": meta.get("created_at"),
        "ferray_version": meta.get("ferray_version"),
        "calibrated": "calibration" in meta,
    }


def _quarantined(source: str, storage: StorageSettings) -> dict[str, int]:
    """Rows earlier stages quarantined (never in DATA's shards), from DATA's `_stats/`."""
    counts: dict[str, int] = {}
    for stats in io.read_stats(source, storage):
        for name, count in stats.get("by_status", {}).items():
            if name != "ok":
                counts[name] = counts.get(name, 0) + int(count)
    return counts


def _figures(rows: scoring.Rows, probs: np.ndarray, embeddings: np.ndarray, metrics: dict[str, Any],
             settings: Settings) -> dict[str, bytes]:
    options = settings.evaluate
    where = f"{', '.join(metrics['data']['datasets'])} {rows.split}"
    counts = np.asarray(metrics["confusion_matrix"]["counts"])
    tsne, tsne_rows = report.tsne_png(embeddings, rows.labels, options.seed, options.tsne_max_rows,
                                      f"t-SNE of {metrics['model']['backbone_name']} embeddings, {where}")
    preds, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong, shown = report.misclassified_png(rows.faces, rows.labels, preds, confidence, options.misclassified_max,
                                            f"Misclassified, {where}")
    curve = reliability(probs, rows.labels, options.ece_bins)
    metrics["figures"] = {"tsne_rows": tsne_rows, "misclassified_shown": shown, "seed": options.seed}
    return {
        "confusion_matrix.png": report.confusion_matrix_png(
            counts, f"Confusion matrix, {where}: accuracy {100 * metrics['accuracy']:.2f}%, n={metrics['n']}"),
        "tsne.png": tsne,
        "misclassified.png": wrong,
        "reliability.png": report.reliability_png(curve, f"Reliability, {where} (n={metrics['n']})"),
    }


def run(settings: Settings, model_uri: str, source: str, out: str, calibrate_on: str | None = None) -> EvalSummary:
    """Evaluate MODEL on DATA's labelled rows and write metrics, predictions, figures and report.md to OUT."""
    started = time.perf_counter()
    storage = settings.storage
    options = settings.evaluate
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    fitted = calibrate(settings, model_uri, calibrate_on).to_dict() if calibrate_on else None
    artifact = artifacts.load(model_uri, storage)
    fingerprint = artifact.meta.get("backbone", {}).get("fingerprint")
    rows = scoring.select(source, storage, fingerprint, options.split, options.reuse_embeddings)
    if len(rows) == 0:
        raise InputError(f"no labelled rows to evaluate in {source} (split {rows.split}, skipped {dict(rows.skipped)})")
    raw, embeddings, flipped = scoring.raw_probabilities(artifact, rows, options.batch_size)
    if len(rows) == 0:  # every face was undecodable
        raise InputError(f"no decodable faces to evaluate in {source} (skipped {dict(rows.skipped)})")
    recipe = artifact.meta.get("inference", {})
    temperature = float(recipe.get("temperature", 1.0))
    probs = apply_recipe(raw, recipe)

    training = paper.training_dataset(artifact.meta, options.train_dataset)
    datasets = sorted(set(rows.datasets))
    metrics: dict[str, Any] = {"stage": "evaluate", "ferray_version": __version__}
    metrics |= classification_metrics(rows.labels, probs, options.ece_bins)
    metrics |= {
        "model": _model_identity(artifact, training, storage),
        "data": {"uri": source, "fingerprint": rows.fingerprint, "shards": rows.shards, "datasets": datasets,
                 "split": rows.split, "rows_ok": rows.ok_rows, "rows_outside_split": rows.outside_split,
                 "split_rule": "as asked" if options.split else "default: test where DATA has one, else all"},
        "path": rows.path,
        "path_reason": "DATA's embeddings come from the model's backbone" if rows.path == "embeddings"
        else "the model's own backbone embeds DATA's aligned faces",
        "inference": {"temperature": temperature, "class_offsets": recipe.get("class_offsets"), "flip_tta": flipped},
        "skipped": {"total": sum(rows.skipped.values()), "by_reason": dict(rows.skipped)},
        "quarantined_upstream": _quarantined(source, storage),
        "paper": paper.comparison(training, datasets, rows.split),
        "paper_results": [asdict(r) for r in paper.RESULTS],
        "calibration_fit": fitted,
    }
    figures = _figures(rows, probs, embeddings, metrics, settings)
    io.write_parquet(predictions_table(rows, probs), io.join(out, PREDICTIONS_FILE), storage)
    for name, png in figures.items():
        io.write_bytes_atomic(io.join(out, name), png, storage)
    io.write_bytes_atomic(io.join(out, REPORT_FILE), report.markdown(metrics).encode(), storage)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    # metrics.json last: its presence says the whole report folder is written.
    io.write_json(io.join(out, METRICS_FILE), metrics, storage)

    summary = EvalSummary(
        source=source, out=out, model=artifact.uri, split=rows.split, path=rows.path, rows=metrics["n"],
        accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], ece=metrics["calibration"]["ece"],
        skipped=dict(rows.skipped), paper=metrics["paper"], calibration=fitted, seconds=metrics["seconds"],
        by_status={"scored": metrics["n"], **{f"skipped:{k}": v for k, v in rows.skipped.items()}})
    io.write_json(io.join(out, io.META, "evaluate.json"), {"summary": summary.to_dict(),
                                                            "settings": settings.public_dict()}, storage)
    log.info("evaluate: accuracy %.4f, macro-F1 %.4f, n %d (%s, split %s, %s path, skipped %d)", summary.accuracy,
             summary.macro_f1, summary.rows, ", ".join(datasets), rows.split, rows.path, sum(rows.skipped.values()))
    return summary
