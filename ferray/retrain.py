"""`ferray pipeline --retrain`: rerun the cached pipeline on today's data, publish the model, gate its promotion.

The pipeline's stages skip every shard whose input is unchanged, and the training run's name holds
the data fingerprint, so a rerun redoes exactly what new or changed labelled data touches. The
candidate is always published to the registry; it becomes `current` only if, on a fixed holdout,
its metric is at least current's minus a tolerance. Both models are scored now, on the same rows,
with the same code: a number stored when `current` was promoted may come from other holdout rows
(new test images arrived with the new data) or another scorer, and re-scoring costs seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ferray import pipeline
from ferray.config import ConfigError, DataSource, Settings, StorageSettings
from ferray.data import io
from ferray.errors import InputError
from ferray.model import CALIBRATION_FILE, META_FILE, MODEL_FILE
from ferray.model.registry import Registry

log = logging.getLogger(__name__)

REGISTRY_DIR = "registry"
SUMMARY_FILE = "retrain.json"
CANDIDATE_DIR = "candidate"
# What a registry version holds: the artifact, and the training run's metrics and history for the
# record. Not the rest of the training folder: its `_checkpoints/` keeps every earlier run's, and
# would be copied into every version.
PUBLISHED_FILES = (MODEL_FILE, META_FILE, CALIBRATION_FILE, "metrics.json", "history.json")


@dataclass(frozen=True)
class Score:
    """One model version's numbers on the holdout rows."""

    version: str
    accuracy: float
    macro_f1: float
    rows: int
    # sha256 of the scored rows' ids and labels: equal fingerprints mean the same faces and labels.
    holdout: str
    path: str  # `embeddings` (the model's backbone made the holdout's embeddings) or `faces`
    seconds: float

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass
class RetrainSummary:
    """What a retrain did and decided, for the one-screen summary and `<workdir>/retrain.json`."""

    workdir: str
    registry: str
    version: str
    promoted: bool
    reason: str
    metric: str
    tolerance: float
    candidate: dict[str, Any]
    current: dict[str, Any] | None
    holdout: dict[str, Any]
    decision: dict[str, Any]
    pipeline: dict[str, Any]
    seconds: float = 0.0
    stage: str = "retrain"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        from ferray.pipeline import render_pipeline

        return f"{render_pipeline(self.pipeline)}\nferray retrain: {self.line()}"

    def line(self) -> str:
        """The decision in one line."""
        verdict = "PROMOTED" if self.promoted else "REJECTED"
        now = self.version if self.promoted else (self.current or {}).get("version")
        where = f"{self.holdout['dataset']} {self.holdout['split']}, {self.holdout['rows']} rows"
        return f"{verdict} {self.version} ({self.reason}; holdout {where}); current: {now} in {self.registry}"


def registry_uri(settings: Settings) -> str:
    return settings.retrain.registry or io.join(settings.pipeline.workdir, REGISTRY_DIR)


def plan(settings: Settings) -> tuple[Settings, DataSource]:
    """The pipeline settings a retrain runs (one backbone, the holdout among its targets) and the holdout."""
    steps = settings.pipeline
    if steps.train is None:
        raise ConfigError("pipeline.train is not set: name the training dataset and its source")
    if len(steps.backbones) > 1:
        raise ConfigError(f"pipeline.backbones lists {len(steps.backbones)} backbones; a retrain trains one "
                          "(set backbone.name, or leave one in pipeline.backbones)")
    holdout = settings.retrain.holdout or steps.train
    targets = list(steps.evaluate)
    if holdout.label == steps.train.label:
        if holdout != steps.train:
            raise ConfigError(f"retrain.holdout is named {holdout.label!r} like the training dataset but reads "
                              "another source; give it its own name")
    else:
        same = [t for t in targets if t.label == holdout.label]
        if same and same[0] != holdout:
            raise ConfigError(f"retrain.holdout and pipeline.evaluate both name {holdout.label!r} with different sources")
        if not same:
            # As an evaluate target the pipeline ingests, aligns and embeds it (cached) and reports on it.
            targets.append(holdout)
    backbone = settings.backbone
    if steps.backbones:
        backbone = type(backbone).model_validate({**backbone.model_dump(), "name": steps.backbones[0]})
    chosen = settings.model_copy(update={
        "backbone": backbone, "pipeline": steps.model_copy(update={"evaluate": targets, "backbones": []})})
    return chosen, holdout


def stage_candidate(model_out: str, workdir: str, storage: StorageSettings) -> str:
    """Copy the artifact files of MODEL_OUT into `<workdir>/candidate/`, the folder the registry publishes."""
    folder = io.join(workdir, CANDIDATE_DIR)
    for name in PUBLISHED_FILES:
        source, target = io.join(model_out, name), io.join(folder, name)
        if io.exists(source, storage):
            io.write_bytes_atomic(target, io.read_bytes(source, storage), storage)
        elif io.exists(target, storage):  # an earlier run's file must not pass as this run's
            fs, path = io.url_to_fs(target, storage)
            fs.rm(path)
    return folder


def holdout_fingerprint(ids: Sequence[str], labels: np.ndarray) -> str:
    """sha256 over the sorted (id, label) pairs: a relabelled or extended holdout is another holdout."""
    lines = sorted(f"{i}\t{int(label)}" for i, label in zip(ids, labels))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def score(settings: Settings, model_uri: str, version: str, data: str, split: str) -> Score:
    """Accuracy and macro-F1 of a model on DATA's `split` rows: `ferray evaluate`'s numbers without its report."""
    from ferray.model import artifact as artifacts
    from ferray.evaluate import scoring
    from ferray.model.head import apply_recipe
    from ferray.evaluate.command import classification_metrics

    started = time.perf_counter()
    storage = settings.storage
    options = settings.evaluate
    artifact = artifacts.load(model_uri, storage)
    fingerprint = artifact.meta.get("backbone", {}).get("fingerprint")
    rows = scoring.select(data, storage, fingerprint, split, options.reuse_embeddings)
    if len(rows) == 0:
        raise InputError(f"the holdout {data} has no labelled {split} rows (skipped {dict(rows.skipped)}); "
                         "a dataset without splits needs retrain.holdout_split: all")
    raw, _, _ = scoring.raw_probabilities(artifact, rows, options.batch_size)
    probs = apply_recipe(raw, artifact.meta.get("inference", {}))
    metrics = classification_metrics(rows.labels, probs, options.ece_bins)
    seconds = time.perf_counter() - started
    result = Score(version=version, accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], rows=len(rows),
                   holdout=holdout_fingerprint(rows.ids, rows.labels), path=rows.path, seconds=round(seconds, 2))
    log.info("retrain: scored %s on the holdout: %d rows in %.1f s, %.0f rows/s (%s path); accuracy %.4f, "
             "macro-F1 %.4f", version, result.rows, seconds, result.rows / seconds if seconds else 0.0, rows.path,
             result.accuracy, result.macro_f1)
    return result


def decide(metric: str, tolerance: float, candidate: Score, current: Score | None) -> tuple[bool, str]:
    """The gate: promote when candidate >= current - tolerance on `metric`; the first model always."""
    if current is None:
        return True, "first model: no current version"
    got, floor = candidate.value(metric), current.value(metric) - tolerance
    relation = ">=" if got >= floor else "<"
    return got >= floor, (f"{metric} {100 * got:.2f}% {relation} current {100 * current.value(metric):.2f}% "
                          f"- tolerance {100 * tolerance:.2f} pts")


def score_both(settings: Settings, registry: Registry, version: str, data: str) -> tuple[Score, Score | None]:
    """The candidate's and `current`'s scores on the same holdout rows (None: no current yet)."""
    split = settings.retrain.holdout_split
    candidate = score(settings, registry.version_uri(version), version, data, split)
    pointer = registry.current()
    if pointer is None:
        return candidate, None
    current = score(settings, registry.version_uri(pointer["version"]), pointer["version"], data, split)
    if current.holdout != candidate.holdout:  # a face one path could not decode and the other could
        raise InputError(f"the candidate and current {current.version} were scored on different holdout rows")
    stored = (pointer.get("metrics") or {}).get("holdout", {}).get("fingerprint")
    if stored != candidate.holdout:
        log.info("retrain: the holdout is not the one %s was promoted on (%s); its stored score is not comparable, "
                 "the re-score is", current.version, "new rows or labels" if stored else "none recorded")
    return candidate, current


def decision_record(settings: Settings, candidate: Score, current: Score | None, held: dict[str, Any],
                    row: dict[str, Any]) -> dict[str, Any]:
    """What `Registry.promote` stores: the verdict, both scores, the holdout and the training run."""
    options, trained_on = settings.retrain, settings.pipeline.train
    promote, reason = decide(options.metric, options.tolerance, candidate, current)
    return {
        "promote": promote,
        "reason": reason,
        "metric": options.metric,
        "tolerance": options.tolerance,
        "scores": {"candidate": candidate.value(options.metric),
                   "current": current.value(options.metric) if current else None},
        "candidate": asdict(candidate),
        "current": asdict(current) if current else None,
        # What the registry's current.json carries once this version is promoted.
        "metrics": {"accuracy": candidate.accuracy, "macro_f1": candidate.macro_f1, "holdout": held},
        "holdout": held,
        "training": {"workdir": settings.pipeline.workdir, "model": row["model"], "val_accuracy": row["val_accuracy"],
                     "train_seconds": row["train_seconds"], "dataset": trained_on.label if trained_on else None,
                     "source": trained_on.source if trained_on else None},
    }


def run(settings: Settings) -> RetrainSummary:
    """Rerun the pipeline, publish the candidate, score it and `current` on the holdout, promote or reject."""
    started = time.perf_counter()
    chosen, holdout = plan(settings)
    storage = chosen.storage
    registry = Registry(registry_uri(chosen), storage)
    # Hours of work must not end at an unreachable registry.
    io.check_reachable(registry.uri, storage, must_exist=False)

    ran = pipeline.run(chosen)
    (row,) = ran.rows
    target = row["reports"][holdout.label]
    log.info("retrain: pipeline done in %.1f s; candidate %s (val accuracy %s)", ran.seconds, row["model"],
             row["val_accuracy"])
    version = registry.publish(stage_candidate(row["model"], chosen.pipeline.workdir, storage))
    candidate, current = score_both(chosen, registry, version, target["data"])
    held = {"dataset": holdout.label, "source": holdout.source, "data": target["data"],
            "split": chosen.retrain.holdout_split, "rows": candidate.rows, "fingerprint": candidate.holdout}
    record = registry.promote(version, decision_record(chosen, candidate, current, held, row))
    summary = RetrainSummary(
        workdir=chosen.pipeline.workdir, registry=registry.uri, version=version, promoted=record["promote"],
        reason=record["reason"], metric=chosen.retrain.metric, tolerance=chosen.retrain.tolerance,
        candidate=asdict(candidate), current=asdict(current) if current else None, holdout=held, decision=record,
        pipeline=ran.to_dict(), seconds=round(time.perf_counter() - started, 2))
    io.write_json(io.join(chosen.pipeline.workdir, SUMMARY_FILE), summary.to_dict(), storage)
    log.info("retrain: %s (%.1f s)", summary.line(), summary.seconds)
    return summary
