"""Ray Train wiring for the head: embedded shards -> TensorflowTrainer workers -> head weights + metrics.

Workers run `tf_keras` (legacy Keras 2) `model.fit` under MultiWorkerMirroredStrategy. Keras 3's
`fit` under that strategy fails on a distributed dataset ("Attempt to convert a value (PerReplica…)"),
and a hand-written `strategy.run` loop would re-implement what tf_keras's `fit` already does right:
per-replica loss scaling, gradient allreduce, metric aggregation, `steps_per_execution` batching of
steps into one graph call. The head is rebuilt in Keras 3 from the same weight list for the artifact.

Speed comes from the data, not the model: each worker materialises its Ray Data shard ONCE into numpy,
then trains from an in-memory `tf.data` pipeline with several steps per graph call; the per-epoch cost
is then the matmuls and one small allreduce per step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ferray.config import HeadSettings, RaySettings, StorageSettings, TrainSettings
from ferray.data import io
from ferray.data.schema import LABELS, SPLITS, STATUS_OK
from ferray.errors import InputError
from ferray.model import head
from ferray.runtime import configure_tensorflow
from ferray.training import runs
from ferray.training.runs import CHECKPOINTS, HISTORY_FILE, METRICS_FILE, EpochHook, TrainResult, TrainState

log = logging.getLogger(__name__)

HEAD_FILE = "head.npz"
__all__ = ["CHECKPOINTS", "HEAD_FILE", "HISTORY_FILE", "METRICS_FILE", "TrainResult", "run", "scan"]


# -- the input -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainData:
    """What the driver learns from a cheap scan of `split`/`label` columns before training."""

    shards: list[str]
    fingerprint: str
    backbone: str | None
    rows: int
    # Labelled, ok rows per split and class (index order of LABELS).
    counts: dict[str, list[int]]
    # Rows training and evaluation cannot use, by reason (`unlabelled`: a class outside the 7).
    skipped: dict[str, int]


def scan(source: str, storage: StorageSettings) -> TrainData:
    """Count usable rows per split × class and the rows to skip, reading only the small columns."""
    shards = io.completed_shards(source, storage)
    if not shards:
        raise io.StorageError(f"no finished shards under {source}")
    fs, first = io.url_to_fs(shards[0], storage)
    with fs.open(first, "rb") as handle:
        names = set(pq.read_schema(handle).names)
    missing = {"split", "label", "embedding"} - names
    if missing:
        raise InputError(f"{source} has no {sorted(missing)} column: not embedded shards (run `ferray embed`)")
    wanted = [c for c in ("split", "label", "status", "backbone") if c in names]
    table = io.read_table(shards, storage, wanted)
    ok = pc.equal(table["status"], STATUS_OK) if "status" in names else pa.array([True] * table.num_rows)
    label, split = table["label"], table["split"]
    skipped = {
        "not_ok": int(pc.sum(pc.invert(ok)).as_py() or 0),
        "unlabelled": int(pc.sum(pc.and_(ok, pc.is_null(label))).as_py() or 0),
        "no_split": int(pc.sum(pc.and_(pc.and_(ok, pc.is_valid(label)), pc.is_null(split))).as_py() or 0),
    }
    labelled = label.filter(pc.is_valid(label))
    if len(labelled) and not (0 <= pc.min(labelled).as_py() and pc.max(labelled).as_py() < len(LABELS)):
        raise InputError(f"{source} has labels outside 0..{len(LABELS) - 1}; a class outside the 7 must be null")
    counts: dict[str, list[int]] = {}
    for name in ("train", "val", "test"):
        mask = pc.and_(pc.and_(ok, pc.equal(split, name)), pc.is_valid(label))
        labels = np.asarray(label.filter(mask).to_numpy(zero_copy_only=False), dtype=np.int64)
        counts[name] = np.bincount(labels, minlength=len(LABELS)).tolist()
    backbones = sorted({b for b in table["backbone"].unique().to_pylist() if b}) if "backbone" in names else []
    if len(backbones) > 1:
        raise InputError(f"{source} mixes embeddings of {backbones}; train on one backbone's output")
    markers = [io.read_json(io.join(source, io.MARKERS, f"{_shard_name(uri)}.json"), storage) for uri in shards]
    fingerprint = hashlib.sha256("\n".join(str(m.get("fingerprint")) for m in markers).encode()).hexdigest()
    return TrainData(shards, fingerprint, backbones[0] if backbones else None, table.num_rows, counts, skipped)


def _shard_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1][: -len(".parquet")]


def read_splits(data: TrainData, storage: StorageSettings) -> dict[str, pa.Table]:
    """Usable rows (labelled, ok, embedded) of train, val and test: one driver-side pass over the shards.

    Embeddings are small (5 KB a face: FER-2013 whole is 180 MB), so the driver reads them with
    pyarrow in a second or two, where Ray Data read tasks would first have to start worker
    processes; and reading before the run means no read task waits for a CPU the workers hold.
    """
    import pyarrow.dataset as pads

    rows = pads.field("split").isin(list(SPLITS)) & pads.field("label").is_valid() & pads.field("embedding").is_valid()
    if data.skipped["not_ok"]:
        rows = rows & (pads.field("status") == STATUS_OK)
    tables = []
    for uri in data.shards:
        fs, path = io.url_to_fs(uri, storage)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=["split", "label", "embedding"], filters=rows))
    table = pa.concat_tables(tables)
    return {split: table.filter(pc.equal(table["split"], split)).drop_columns(["split"]) for split in SPLITS}


def to_numpy(batches: Iterable[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, dim), labels int64 (n,)) from Arrow batches, without per-row Python."""
    tables = [t for t in batches if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    table = pa.concat_tables(tables)
    column = table["embedding"].combine_chunks()
    lengths = pc.list_value_length(column)
    low, high = pc.min_max(lengths).values()
    if low.as_py() != high.as_py():
        raise InputError(f"embeddings of different sizes ({low}..{high}) in one training set")
    x = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(table), -1)
    y = np.asarray(table["label"].to_numpy(zero_copy_only=False), dtype=np.int64)
    return x, y


# -- the worker ------------------------------------------------------------------------------------


def _configure_tensorflow(train: TrainSettings) -> Any:
    """Threads and GPU memory before any TF op; returns the strategy (must precede other TF ops)."""
    import tensorflow as tf

    # MultiWorkerMirroredStrategy logs every allreduce at INFO.
    tf.get_logger().setLevel(logging.WARNING)
    configure_tensorflow(train.cpus_per_worker, inter_op=max(1, math.floor(train.cpus_per_worker)))
    return tf.distribute.MultiWorkerMirroredStrategy()


def _input_pipeline(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None, batch: int, seed: int) -> Any:
    """An endless, reshuffled in-memory dataset of this worker's rows; Ray already sharded them."""
    import tensorflow as tf

    tensors = (x, head.one_hot(y)) if sample_weight is None else (x, head.one_hot(y), sample_weight[y])
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return (
        tf.data.Dataset.from_tensor_slices(tensors)
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(batch, drop_remainder=True)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )


def _val_metrics(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if len(y) == 0:
        return {}
    probs = head.predict(model, x)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))
    return {"val_loss": loss, "val_accuracy": head.accuracy(probs, y)}


def train_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: materialise the shard once, resume if a checkpoint exists, fit."""
    import ray
    import ray.train
    import tf_keras
    from ray.train.collective import broadcast_from_rank_zero

    head_settings = HeadSettings(**config["head"])
    train = TrainSettings(**config["train"])
    hook: EpochHook | None = config.get("epoch_hook")
    strategy = _configure_tensorflow(train)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    started = time.perf_counter()
    x, y = to_numpy(ray.train.get_dataset_shard("train").iter_batches(batch_size=None, batch_format="pyarrow"))
    # Only rank 0 scores val (its verdict is broadcast where it matters), so only it fetches val.
    has_val = config["val"] is not None
    x_val, y_val = ray.get(config["val"]) if rank == 0 and has_val else (np.zeros((0, 0)), np.zeros((0,), np.int64))
    log.info("rank %d: %d train rows, %d val rows in %.1fs", rank, len(x), len(y_val), time.perf_counter() - started)

    # Ray splits rows equally, so every worker runs the same number of steps (a must for allreduce).
    batch = max(1, min(train.batch_size // world, len(x)))
    steps = len(x) // batch
    weights = np.asarray(config["class_weight"], np.float32) if config["class_weight"] is not None else None
    tf_keras.utils.set_random_seed(train.seed)
    with strategy.scope():
        model = head.build_head(tf_keras, x.shape[1], head_settings.hidden, head_settings.dropout)
        head.compile_head(model, tf_keras, train, steps_per_execution=min(train.steps_per_execution, steps))

    checkpoint = ray.train.get_checkpoint()
    state = TrainState()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = TrainState.load(folder)
        with strategy.scope():
            model.set_weights(state.weights)
            runs.restore_optimizer(model.optimizer, model.trainable_variables, state.optimizer)
        log.info("rank %d: resuming after epoch %d", rank, state.epochs_done)
    if state.finished(train.epochs):
        return
    state.starts.append(state.epochs_done)

    class EpochEnd(tf_keras.callbacks.Callback):  # type: ignore[misc]  # tf_keras is untyped
        """Per-epoch learning rate, val metrics, best weights, report + checkpoint, early stop."""

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if hook is not None:
                hook(rank, epoch)
            self.started = time.perf_counter()
            self.model.optimizer.learning_rate.assign(head.learning_rate(train, epoch))

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            # The rate the optimizer actually used, read back rather than recomputed.
            row = {"epoch": epoch + 1, "lr": float(self.model.optimizer.learning_rate.numpy())}
            row |= {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "accuracy")}
            row |= _val_metrics(self.model, x_val, y_val)
            row["seconds"] = round(time.perf_counter() - self.started, 3)
            state.record(row, self.model.get_weights, choose=rank == 0)  # rank 0 alone sees val and checkpoints
            if train.patience:
                # Every worker must stop at the same step or allreduce hangs: rank 0 decides for all.
                stop = epoch + 1 - state.best_epoch >= train.patience if rank == 0 else False
                if broadcast_from_rank_zero(stop):
                    state.stop("patience")
                    self.model.stop_training = True
            if rank == 0:
                state.weights = self.model.get_weights()
                state.optimizer = [np.asarray(v.numpy()) for v in self.model.optimizer.variables]
            runs.report(state, row, checkpoint=rank == 0)

    dataset = _input_pipeline(x, y, weights, batch, train.seed + rank)
    model.fit(
        dataset,
        epochs=train.epochs,
        initial_epoch=state.epochs_done,
        steps_per_epoch=steps,
        callbacks=[EpochEnd()],
        verbose=0,
    )


# -- the driver ------------------------------------------------------------------------------------


def run_name(data: TrainData, head_settings: HeadSettings, train: TrainSettings) -> str:
    if train.run_name:
        return train.run_name
    return runs.run_name("head", {"data": data.fingerprint, "head": head_settings.model_dump(mode="json"),
                                  "train": train.recipe()})


def _evaluate(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float | None:
    """Accuracy of the Keras 3 head rebuilt from `weights` (the artifact's Keras) on one split."""
    if len(y) == 0:
        return None
    import keras

    return head.accuracy(head.predict(head.head_from_weights(keras, weights), x), y)


def run(
    settings: Any,
    source: str,
    model_out: str,
    *,
    head_settings: HeadSettings | None = None,
    train: TrainSettings | None = None,
    epoch_hook: EpochHook | None = None,
) -> TrainResult:
    """Train the head on SOURCE's embedded shards with Ray Train; write weights and metrics to MODEL_OUT.

    `head_settings` / `train` override the settings' sections (bench sweeps). The model artifact is
    built from these outputs by `ferray.training.run`.
    """
    import ray
    import ray.data

    from ferray.runtime import ensure_ray

    head_settings = head_settings or settings.head
    train = train or settings.train
    storage: StorageSettings = settings.storage
    ray_settings: RaySettings = settings.ray
    started = time.perf_counter()

    data = scan(source, storage)
    if sum(data.counts["train"]) < train.workers:
        raise InputError(f"{sum(data.counts['train'])} labelled train rows in {source}, fewer than the "
                         f"{train.workers} workers (rows by split: {data.counts}, skipped: {data.skipped})")
    name = run_name(data, head_settings, train)
    checkpoints = train.checkpoints or io.join(model_out, CHECKPOINTS)
    done = runs.finished(model_out, name, storage)
    if done is not None:
        log.info("train: %s already finished in %s; nothing to do", name, model_out)
        return done
    log.info("train: run %s, rows %s, skipped %s", name, {k: sum(v) for k, v in data.counts.items()}, data.skipped)

    ensure_ray(ray_settings)
    splits = read_splits(data, storage)
    val, test = to_numpy([splits["val"]]), to_numpy([splits["test"]])
    weights = head.class_weights(data.counts["train"], train.class_weight)
    config = {
        "head": head_settings.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        # One copy in the object store, fetched by rank 0 only.
        "val": ray.put(val) if len(val[1]) else None,
        "class_weight": None if weights is None else weights.tolist(),
        "epoch_hook": epoch_hook,
    }
    # Each worker reads its share of the blocks through get_dataset_shard("train").
    state = runs.fit(train_worker, config, name, checkpoints, train, storage, workers=train.workers,
                     legacy_keras=True, datasets={"train": ray.data.from_arrow(splits["train"])})
    best = state.best_weights or state.weights
    seconds = time.perf_counter() - started
    result = TrainResult(
        model_out=model_out, run_name=name, checkpoints=io.join(checkpoints, name),
        rows={k: sum(v) for k, v in data.counts.items()}, skipped=data.skipped,
        epochs_run=state.epochs_done, best_epoch=state.best_epoch, starts=state.starts,
        stopped_early=state.stopped_early, stop_reason=state.stop_reason, val_accuracy=_evaluate(best, *val), test_accuracy=_evaluate(best, *test),
        seconds=round(seconds, 2), seconds_per_epoch=runs.median_epoch_seconds(state),
        data_fingerprint=data.fingerprint, backbone=data.backbone, input_dim=int(best[0].shape[0]),
        counts=data.counts, head=head_settings.model_dump(mode="json"), train=train.model_dump(mode="json"),
    )
    io.write_bytes_atomic(io.join(model_out, HEAD_FILE), head.weights_to_npz(best), storage)
    runs.write_run_files(model_out, state, result, settings, storage)
    log.info("train: best epoch %d, val %.4f, test %s, %.1fs", result.best_epoch, result.val_accuracy or float("nan"),
             result.test_accuracy, seconds)
    return result


def load_head_weights(model_out: str, storage: StorageSettings) -> list[np.ndarray]:
    """The best-on-val head weights a run wrote to MODEL_OUT (for the artifact builder)."""
    return head.weights_from_npz(io.read_bytes(io.join(model_out, HEAD_FILE), storage))
