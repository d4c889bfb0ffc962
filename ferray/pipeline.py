"""`ferray pipeline`: ingest → align → embed → train → evaluate from one config, every stage cached.

Layout under `pipeline.workdir`:
  data/<dataset>/ingested, data/<dataset>/aligned, data/<dataset>/embedded/<backbone identity>
  models/<backbone identity>/          the artifact (model.keras + ferray.json) and training outputs
  reports/<backbone>/<dataset>/        evaluate's report for each target
  sweep.md, sweep.json                 one row per backbone (the paper's model-selection table)
Each stage skips finished shards, so a rerun redoes only what changed.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ferray.config import ConfigError, DataSource, Settings
from ferray.data import ingest, io
from ferray.faces import stage as align
from ferray.model import artifact as artifacts
from ferray.model import embed

log = logging.getLogger(__name__)


@dataclass
class PipelineSummary:
    """One row per backbone: where its model and reports are and how well it did."""

    workdir: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stage: str = "pipeline"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "workdir": self.workdir, "rows": self.rows, "seconds": self.seconds}

    def render(self) -> str:
        return render_pipeline(self.to_dict())


def render_pipeline(data: dict[str, Any]) -> str:
    """The one-screen summary of a pipeline run: a model and its reports per backbone."""
    from ferray.training.runs import percent

    lines = [f"ferray pipeline: {data['workdir']}   time: {data['seconds']:.1f} s"]
    for row in data["rows"]:
        lines.append(f"  {row['backbone']}: model {row['model']}  (val accuracy {percent(row['val_accuracy'])})")
        for target, report in row["reports"].items():
            lines.append(f"    {target} {report['split']} ({report['rows']} rows): accuracy {percent(report['accuracy'])}, "
                         f"macro-F1 {percent(report['macro_f1'])}  -> {report['report']}/report.md")
    lines.append(f"  sweep table: {data['workdir']}/sweep.md")
    return "\n".join(lines)


def _log_stage(name: str, summary: Any) -> None:
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    log.info("%s: %d rows (%d shards written, %d skipped) in %.1f s, %.0f rows/s", name, summary.rows,
             summary.shards_written, summary.shards_skipped, summary.seconds, rate)


def _log_training(result: Any, wall: float) -> None:
    # Rows seen per second over the whole training run, start-up included. A finished run found in
    # the cache is returned as it was, so this call's own wall time is logged beside it.
    rows = result.rows.get("train", 0)
    rate = rows * result.epochs_run / result.seconds if result.seconds else 0.0
    log.info("train %s: %d rows x %d epochs in %.1f s, %.0f rows/s (this call %.1f s)", result.run_name, rows,
             result.epochs_run, result.seconds, rate, wall)


def prepare(settings: Settings, source: DataSource, workdir: str) -> str:
    """Ingest and align one dataset (cached); returns its aligned shards."""
    base = io.join(workdir, "data", source.label)
    ingested, aligned = io.join(base, "ingested"), io.join(base, "aligned")
    _log_stage(f"ingest {source.label}", ingest.run(settings, source.dataset, source.source, ingested))
    _log_stage(f"align {source.label}", align.run(settings, ingested, aligned))
    return aligned


def embedded(settings: Settings, aligned: str, workdir: str, label: str) -> tuple[str, float | None]:
    """Embed one dataset with the configured backbone (cached per backbone identity)."""
    from ferray.model.backbones import backbone_fingerprint

    storage = settings.storage
    identity = backbone_fingerprint(settings.backbone, fetch=functools.partial(io.fetch_cached, storage=storage),
                                    image_size=settings.faces.size)
    out = io.join(workdir, "data", label, "embedded", identity)
    summary = embed.run(settings, aligned, out)
    _log_stage(f"embed {label} ({identity})", summary)
    fresh = summary.shards_written and summary.seconds
    return out, (summary.rows / summary.seconds if fresh else None)


def run(settings: Settings) -> PipelineSummary:
    from ferray import evaluate, training

    plan = settings.pipeline
    if plan.train is None:
        raise ConfigError("pipeline.train is not set: name the training dataset and its source")
    started = time.perf_counter()
    storage = settings.storage
    targets = [plan.train, *[t for t in plan.evaluate if t.label != plan.train.label]]
    aligned = {t.label: prepare(settings, t, plan.workdir) for t in targets}
    summary = PipelineSummary(workdir=plan.workdir)
    for name in plan.backbones or [settings.backbone.name]:
        # Validated, so a misspelt backbone in the sweep fails here with the field's name.
        backbone = type(settings.backbone).model_validate({**settings.backbone.model_dump(), "name": name})
        chosen = settings.model_copy(update={"backbone": backbone})
        began = time.perf_counter()
        if settings.finetune.enabled:
            # The backbone changes, so there is no embedding cache: train and score on aligned faces.
            data = {t.label: (aligned[t.label], None) for t in targets}
            model_out, result, parameters = _fine_tune(chosen, aligned[plan.train.label], plan.workdir, name)
            rate = None
            _log_training(result, time.perf_counter() - began)
        else:
            data = {t.label: embedded(chosen, aligned[t.label], plan.workdir, t.label) for t in targets}
            train_data, rate = data[plan.train.label]
            model_out = io.join(plan.workdir, "models", train_data.rsplit("/", 1)[-1])
            began = time.perf_counter()
            result = training.run(chosen, train_data, model_out)
            _log_training(result, time.perf_counter() - began)
            parameters = int(artifacts.load(model_out, storage).model.count_params())
        row: dict[str, Any] = {"backbone": name, "model": model_out, "val_accuracy": result.val_accuracy,
                               "parameters": parameters, "embeddings_per_s": rate,
                               "train_seconds": result.seconds, "reports": {}}
        for target in targets:
            report = io.join(plan.workdir, "reports", name, target.label)
            evaluation = evaluate.run(chosen, model_out, data[target.label][0], report)
            # `data`: the shards scored (embedded; aligned when fine-tuned), so the retrain gate can score
            # other models on the same rows.
            row["reports"][target.label] = {"report": report, "data": data[target.label][0], "split": evaluation.split,
                                            "rows": evaluation.rows, "accuracy": evaluation.accuracy,
                                            "macro_f1": evaluation.macro_f1}
            log.info("evaluate %s on %s %s: %d rows in %.1f s, %.0f rows/s", name, target.label, evaluation.split,
                     evaluation.rows, evaluation.seconds, evaluation.rows / evaluation.seconds if evaluation.seconds else 0.0)
        summary.rows.append(row)
    summary.seconds = round(time.perf_counter() - started, 2)
    io.write_json(io.join(plan.workdir, "sweep.json"), summary.to_dict(), storage)
    io.write_bytes_atomic(io.join(plan.workdir, "sweep.md"), sweep_markdown(summary, plan.train.label).encode(), storage)
    return summary


def _fine_tune(settings: Settings, aligned: str, workdir: str, backbone: str) -> tuple[str, Any, int]:
    """`finetune.unfreeze` set: adapt the backbone on the aligned training faces (ferray.training.tune)."""
    from ferray import training

    model_out = io.join(workdir, "models", f"{backbone}-finetune")
    result = training.run(settings, aligned, model_out)
    parameters = int(artifacts.load(model_out, settings.storage).model.count_params())
    return model_out, result, parameters


def sweep_markdown(summary: PipelineSummary, train_label: str) -> str:
    """The backbone comparison table (accuracy and macro-F1 on the training dataset's test split)."""
    lines = [f"# Backbone sweep — trained on {train_label}", "",
             "| backbone | val acc | test acc | test macro-F1 | parameters | embeddings/s |",
             "|---|---|---|---|---|---|"]
    for row in summary.rows:
        own = row["reports"].get(train_label, {})
        rate = f"{row['embeddings_per_s']:.0f}" if row["embeddings_per_s"] else "cached or fine-tuned"
        lines.append(f"| {row['backbone']} | {_pct(row['val_accuracy'])} | {_pct(own.get('accuracy'))} | "
                     f"{_pct(own.get('macro_f1'))} | {row['parameters']:,} | {rate} |")
    lines += ["", "Cross-dataset results per backbone are in `reports/<backbone>/<dataset>/report.md`."]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"
