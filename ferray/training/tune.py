"""`ferray train --fine-tune K`: adapt the backbone to faces end to end on a Ray Train worker.

The frozen path (ferray.training.train) fits a head on cached embeddings; this one trains backbone + head on
aligned faces with augmentation, so the backbone itself learns faces. The result is an ordinary
ferray model; its backbone, reused frozen (`backbone.weights: artifact:MODEL`), gives every later
head (scheduled retraining included) face features at embedding-cache speed.

Why one worker: Keras 3 `fit` does not run under TensorFlow's MultiWorkerMirroredStrategy on Ray's
data (the head path uses tf_keras for that), and a fine-tune is a job for one GPU anyway: the
backbone's forward/backward pass, not gradient exchange, is the cost. Ray Train still gives it
what matters: GPU placement, a checkpoint every epoch, and a restarted worker that resumes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ferray.config import BackboneSettings, FineTuneSettings, Settings, StorageSettings, TrainSettings
from ferray.data import io
from ferray.data.schema import FACE, LABELS, SPLITS, STATUS_OK
from ferray.errors import InputError
from ferray.runtime import configure_tensorflow
from ferray.training import runs
from ferray.training.runs import CHECKPOINTS, HISTORY_FILE, METRICS_FILE, EpochHook, TrainResult, TrainState

log = logging.getLogger(__name__)
__all__ = ["CHECKPOINTS", "HISTORY_FILE", "METRICS_FILE", "TrainResult", "load_faces", "run"]


# -- the input -------------------------------------------------------------------------------------


@dataclass
class Faces:
    """Aligned, labelled faces of one split as uint8 (N, side, side, channels) and int labels, and for
    distillation the teachers' mean probabilities of each face."""

    x: np.ndarray
    y: np.ndarray
    soft: np.ndarray | None = None


def load_faces(source: str, storage: StorageSettings, side: int, channels: int) -> tuple[dict[str, Faces], dict[str, int], str]:
    """Every usable aligned face by split, the rows skipped by reason, and a fingerprint of the data."""
    from ferray.model.embed import decode_faces

    shards = io.completed_shards(source, storage)
    if not shards:
        raise io.StorageError(f"no finished shards under {source}")
    table = io.read_table(shards, storage)
    if FACE not in table.column_names:
        raise InputError(f"{source} has no `{FACE}` column: fine-tuning reads aligned shards (run `ferray align`)")
    ok = pc.equal(table["status"], STATUS_OK)
    usable = pc.and_(pc.and_(ok, pc.is_valid(table["label"])), pc.is_valid(table["split"]))
    skipped = {"not_ok": int(pc.sum(pc.invert(ok)).as_py() or 0),
               "unlabelled_or_no_split": int(pc.sum(pc.and_(ok, pc.invert(usable))).as_py() or 0)}
    table = table.filter(usable).sort_by("id")
    digest = hashlib.sha256()
    for row_id, label in zip(table["id"].to_pylist(), table["label"].to_pylist()):
        digest.update(f"{row_id}:{label}\n".encode())
    faces: dict[str, Faces] = {}
    for split in SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        x = decode_faces(part[FACE].to_pylist(), side, channels).astype(np.uint8)
        faces[split] = Faces(x, np.asarray(part["label"].to_numpy(zero_copy_only=False), np.int64))
    return faces, skipped, digest.hexdigest()


def teach(teachers: list[str], faces: Faces, storage: StorageSettings) -> tuple[np.ndarray, list[str]]:
    """The teachers' mean probabilities of `faces` (each with its own TTA and temperature), and their
    versions: what the run's name and the artifact record, never where the teachers were read from."""
    from ferray.model import artifact as artifacts

    probs, versions = [], []
    for uri in teachers:
        teacher = artifacts.load(uri, storage)
        probs.append(teacher.predict(faces.x.astype(np.float32)))
        versions.append(artifacts.version_of(teacher.uri, teacher.meta))
        log.info("fine-tune: teacher %s: %.4f accuracy on the %d faces it teaches", versions[-1],
                 float((probs[-1].argmax(axis=1) == faces.y).mean()) if len(faces.y) else 0.0, len(faces.y))
    return np.mean(probs, axis=0).astype(np.float32), versions


# -- the model -------------------------------------------------------------------------------------


def backbone_settings(settings: Settings) -> BackboneSettings:
    """The configured backbone at the fine-tune's input size (the face is resized inside the model)."""
    return settings.backbone.model_copy(update={"input_size": settings.finetune.input_size})


def build_classifier(backbone: BackboneSettings, recipe: FineTuneSettings, face_size: int,
                     storage: StorageSettings, weights: Any = None) -> Any:
    """face → backbone (top blocks trainable per `recipe.unfreeze`) → two-layer head → 7 probabilities."""
    from ferray.training import finetune
    from ferray.model.backbones import build_backbone

    fetch = functools.partial(io.fetch_cached, storage=storage)
    net = build_backbone(backbone, fetch, weights=weights, image_size=face_size)
    trainable = finetune.unfreeze(net, recipe.unfreeze if recipe.unfreeze is not None else 0)
    log.info("fine-tune: %s, unfreeze %s, %d trainable backbone parameters", backbone.name, recipe.unfreeze, trainable)
    return finetune.classifier(net, recipe)


# -- the worker ------------------------------------------------------------------------------------


def tune_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: build, resume from the last checkpoint if any, fit, report each epoch."""
    import keras
    import ray
    import ray.train

    from ferray.model import head
    from ferray.training import finetune

    recipe = FineTuneSettings(**config["finetune"])
    train = TrainSettings(**config["train"])
    hook: EpochHook | None = config.get("epoch_hook")
    configure_tensorflow(train.cpus_per_worker)
    keras.utils.set_random_seed(recipe.seed)
    data: dict[str, Faces] = ray.get(config["faces"])
    x, y = data["train"].x, data["train"].y
    x_val, y_val = data["val"].x, data["val"].y

    model = build_classifier(BackboneSettings(**config["backbone"]), recipe, config["face_size"], ray.get(config["storage"]))
    steps = math.ceil(len(x) / recipe.batch_size)
    trainer = finetune.training_model(model, recipe, steps)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = TrainState.load(folder)
        model.set_weights(state.weights)
        runs.restore_optimizer(trainer.optimizer, trainer.trainable_variables, state.optimizer)
        log.info("fine-tune: resuming after epoch %d", state.epochs_done)
    if state.finished(recipe.epochs):
        return
    spent = state.seconds_spent
    if recipe.time_budget_s is not None and state.history and spent + state.history[-1]["seconds"] > recipe.time_budget_s:
        # The budget (not part of the run's name) was lowered for this rerun: finish with the best so far.
        log.warning("fine-tune: %.0f s spent of a %.0f s budget; finishing after epoch %d", spent,
                    recipe.time_budget_s, state.epochs_done)
        state.stop("budget")
        runs.report(state, state.history[-1])
        return
    # A run the budget stopped goes on when its rerun raised the budget.
    state.stopped_early, state.stop_reason = False, None
    state.starts.append(state.epochs_done)

    def best_weights() -> list[np.ndarray]:
        return finetune.averaged_weights(model, trainer.optimizer) if recipe.ema else model.get_weights()

    class EpochEnd(keras.callbacks.Callback):
        """Best-on-val weights, budget and patience, then report + checkpoint every epoch."""

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if hook is not None:
                hook(0, epoch)
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            row = {"epoch": epoch + 1, "lr": float(keras.ops.convert_to_numpy(trainer.optimizer.learning_rate))}
            row |= {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
            row["seconds"] = round(time.perf_counter() - self.started, 3)
            state.record(row, best_weights)
            # Stop before an epoch that would not fit in the budget, judged by this one's length.
            over_budget = (recipe.time_budget_s is not None
                           and state.seconds_spent + row["seconds"] > recipe.time_budget_s)
            stale = recipe.patience and epoch + 1 - state.best_epoch >= recipe.patience
            if over_budget or stale:
                log.warning("fine-tune: stopping after epoch %d (%s)", epoch + 1, "time budget" if over_budget else "patience")
                state.stop("budget" if over_budget else "patience")
                trainer.stop_training = True
            state.weights = model.get_weights()
            state.optimizer = [np.asarray(keras.ops.convert_to_numpy(v)) for v in trainer.optimizer.variables]
            runs.report(state, row)
            log.info("fine-tune epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})

    weights = head.class_weights(np.bincount(y, minlength=len(LABELS)).tolist(), recipe.class_weight)
    batches = finetune.MixedBatches(x, y, recipe, len(LABELS), weights, first_epoch=state.epochs_done,
                                    soft=data["train"].soft)
    callbacks: list[keras.callbacks.Callback] = [EpochEnd()]
    if recipe.ema:
        # Validation sees the averaged weights; EpochEnd (after it in the list) then finds the raw ones back.
        callbacks.insert(0, keras.callbacks.SwapEMAWeights())
    trainer.fit(
        batches,
        validation_data=(x_val, keras.utils.to_categorical(y_val, len(LABELS))) if len(y_val) else None,
        epochs=recipe.epochs, initial_epoch=state.epochs_done,
        callbacks=callbacks, verbose=0,
    )


def _identify_backbone(meta: dict[str, Any], model: Any) -> None:
    """The adapted backbone is no longer the ImageNet one: give it its own sha256 and fingerprint, so
    evaluate never scores this head on cached ImageNet embeddings of the same name and size."""
    from ferray.model.backbones import BACKBONE_LAYER

    digest = hashlib.sha256()
    for array in model.get_layer(BACKBONE_LAYER).get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    sha = digest.hexdigest()
    info = meta["backbone"]
    info["weights_source"] = f"fine-tuned from {info['weights_source']}"
    info["weights_sha256"] = meta["weights_sha256"] = sha
    info["fingerprint"] = f"{info['name']}-{info['input_size']}px-c{info['channels']}-ft{sha[:16]}"
    meta["weights_source"] = info["weights_source"]


# -- the driver ------------------------------------------------------------------------------------


def run_name(fingerprint: str, settings: Settings, teachers: list[str] | None = None) -> str:
    """`teachers`: the teachers' versions, which name them wherever they are read from."""
    if settings.train.run_name:
        return settings.train.run_name
    # Neither the time budget nor the inference settings change the trained weights.
    recipe = settings.finetune.model_dump(mode="json", exclude={"time_budget_s", "flip_tta", "calibrate"})
    if teachers is not None:
        recipe["teachers"] = teachers
    return runs.run_name("tune", {"data": fingerprint, "finetune": recipe, "face_size": settings.faces.size,
                                  "backbone": settings.backbone.model_dump(mode="json")})


def _fit(faces: dict[str, Faces], settings: Settings, name: str, checkpoints: str, storage: StorageSettings,
         epoch_hook: EpochHook | None) -> TrainState:
    import ray

    config = {
        "finetune": settings.finetune.model_dump(mode="json"),
        "train": settings.train.model_dump(mode="json"),
        "backbone": backbone_settings(settings).model_dump(mode="json"),
        "face_size": settings.faces.size,
        # Object refs, so neither the faces nor the credentials land in Ray Train's saved run config.
        "storage": ray.put(storage),
        "faces": ray.put({k: faces[k] for k in ("train", "val")}),
        "epoch_hook": epoch_hook,
    }
    return runs.fit(tune_worker, config, name, checkpoints, settings.train, storage, workers=1, legacy_keras=False)


def _budget_raised(done: TrainResult, recipe: FineTuneSettings) -> bool:
    """A run its time budget stopped, rerun with a larger budget (or none), has epochs left to train."""
    if done.stop_reason != "budget" or done.epochs_run >= recipe.epochs:
        return False
    before = (done.finetune or {}).get("time_budget_s")
    return recipe.time_budget_s is None or (before is not None and recipe.time_budget_s > before)


def run(settings: Settings, source: str, model_out: str, *, epoch_hook: EpochHook | None = None) -> TrainResult:
    """Fine-tune on SOURCE's aligned faces (train; select on val; report test) and write the artifact."""
    from ferray.model import artifact as artifacts
    from ferray.model.backbones import backbone_metadata, resolve_weights
    from ferray.evaluate.calibration import apply_temperature, fit_temperature
    from ferray.evaluate.command import accuracy_and_macro_f1
    from ferray.runtime import ensure_ray

    recipe, train = settings.finetune, settings.train
    if not recipe.enabled:
        raise InputError("fine-tuning is off: set finetune.unfreeze (or `--fine-tune K|all`)")
    if train.workers != 1:
        raise InputError(f"fine-tuning runs on one worker (one GPU or the CPUs of one node), not {train.workers}: "
                         "set train.workers: 1")
    storage = settings.storage
    started = time.perf_counter()
    faces, skipped, fingerprint = load_faces(source, storage, settings.faces.size, settings.backbone.channels)
    rows = {k: len(v.y) for k, v in faces.items()}
    if rows["train"] == 0:
        raise InputError(f"no labelled train rows in {source} (rows {rows}, skipped {skipped})")
    recorded = recipe.model_dump(mode="json")
    if recipe.teachers:
        faces["train"].soft, recorded["teachers"] = teach(recipe.teachers, faces["train"], storage)
    name = run_name(fingerprint, settings, recorded["teachers"] if recipe.teachers else None)
    done = runs.finished(model_out, name, storage)
    if done is not None and _budget_raised(done, recipe):
        log.info("fine-tune: %s stopped on its time budget, now raised: training on from its checkpoint", name)
    elif done is not None:
        log.info("fine-tune: %s already finished in %s; nothing to do", name, model_out)
        return done
    log.info("fine-tune: run %s, rows %s, skipped %s", name, rows, skipped)
    checkpoints = train.checkpoints or io.join(model_out, CHECKPOINTS)

    ensure_ray(settings.ray)
    state = _fit(faces, settings, name, checkpoints, storage, epoch_hook)
    fit_seconds = time.perf_counter() - started

    # The driver rebuilds the model (weights: none, then the best-on-val weights) and scores it.
    weights = resolve_weights(backbone_settings(settings), functools.partial(io.fetch_cached, storage=storage))
    model = build_classifier(backbone_settings(settings), recipe, settings.faces.size, storage, weights)
    model.set_weights(state.best_weights or state.weights)
    model.trainable = False
    meta = artifacts.metadata(settings, backbone_metadata(backbone_settings(settings), weights, settings.faces.size),
                              {}, fingerprint, inference={"flip_tta": recipe.flip_tta})
    artifact = artifacts.Artifact(uri=model_out, model=model, meta=meta)
    clock = time.perf_counter()
    raw = {k: artifact.predict(v.x.astype(np.float32)) for k, v in faces.items() if k in ("val", "test")}
    passes = sum(len(faces[k].y) for k in raw) * (2 if recipe.flip_tta else 1)
    faces_per_s = passes / max(time.perf_counter() - clock, 1e-9)
    temperature = fit_temperature(raw["val"], faces["val"].y) if recipe.calibrate and len(faces["val"].y) else 1.0
    meta["inference"]["temperature"] = temperature
    (val_acc, val_f1), (test_acc, test_f1) = (accuracy_and_macro_f1(apply_temperature(raw[k], temperature), faces[k].y)
                                              for k in ("val", "test"))
    result = TrainResult(
        model_out=model_out, run_name=name, checkpoints=io.join(checkpoints, name), rows=rows, skipped=skipped,
        epochs_run=state.epochs_done, best_epoch=state.best_epoch, starts=state.starts,
        stopped_early=state.stopped_early, stop_reason=state.stop_reason, val_accuracy=val_acc, test_accuracy=test_acc, val_macro_f1=val_f1,
        test_macro_f1=test_f1, flip_tta=recipe.flip_tta, temperature=round(temperature, 4),
        seconds=round(fit_seconds, 2), seconds_per_epoch=runs.median_epoch_seconds(state),
        faces_per_s=round(faces_per_s / (2 if recipe.flip_tta else 1), 1),
        finetune=recorded, data_fingerprint=fingerprint,
    )
    # Where this run wrote its files is the run's business (metrics.json), not the model's.
    meta["metrics"] = {k: v for k, v in result.to_dict().items() if k not in ("model_out", "checkpoints")}
    meta["training_dataset"] = artifacts.training_datasets(source, storage)
    _identify_backbone(meta, model)
    artifacts.save(model, meta, model_out, storage)
    runs.write_run_files(model_out, state, result, settings, storage)
    log.info("fine-tune: best epoch %d, val %.4f, test %s (flip TTA %s, T %.3f), %.0f s", result.best_epoch,
             val_acc or float("nan"), test_acc, recipe.flip_tta, temperature, fit_seconds)
    return result
