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

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ferray import logs
from ferray.config import HeadSettings, RaySettings, StorageSettings, TrainSettings
from ferray.data import io
from ferray.data.schema import LABELS, SPLITS, STATUS_OK
from ferray.errors import InputError
from ferray.model import head
from ferray.runtime import configure_tensorflow

log = logging.getLogger(__name__)

HEAD_FILE = "head.npz"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "_checkpoints"
_STATE_NPZ, _STATE_JSON = "state.npz", "state.json"
_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

# Called on every worker at the start of each epoch with (world rank, 0-based epoch); a hook for
# fault drills and instrumentation. Must pickle (Ray ships it to the workers).
EpochHook = Callable[[int, int], None]


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


def _arrow_fs(uri: str, storage: StorageSettings) -> tuple[pa.fs.FileSystem | None, str]:
    """A pyarrow filesystem over ferray.data.io's fsspec one, for Ray Train's storage (None: local)."""
    if not io.is_remote(uri):
        return None, os.path.abspath(io.url_to_fs(uri, storage)[1])
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = io.url_to_fs(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


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


# -- checkpoints -----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a resumed run needs, and what the driver reads back from the last checkpoint."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 = none yet
    best_val_accuracy: float = -1.0
    stopped_early: bool = False
    # epochs_done at each (re)start of the worker loop: [0] for a clean run, [0, 3] after a resume.
    starts: list[int] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    optimizer: list[np.ndarray] = field(default_factory=list)
    best_weights: list[np.ndarray] = field(default_factory=list)

    def save(self, folder: str) -> None:
        arrays = {f"o{i:03d}": a for i, a in enumerate(self.optimizer)}
        arrays |= {f"b{i:03d}": a for i, a in enumerate(self.best_weights)}
        Path(folder, _STATE_NPZ).write_bytes(head.weights_to_npz(self.weights, **arrays))
        meta = {k: v for k, v in asdict(self).items() if k not in ("weights", "optimizer", "best_weights")}
        Path(folder, _STATE_JSON).write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str) -> TrainState:
        meta = json.loads(Path(folder, _STATE_JSON).read_text())
        data = Path(folder, _STATE_NPZ).read_bytes()
        return cls(
            **meta,
            weights=head.weights_from_npz(data, "w"),
            optimizer=head.weights_from_npz(data, "o"),
            best_weights=head.weights_from_npz(data, "b"),
        )

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.epochs_done >= epochs


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


def _restore(model: Any, state: TrainState) -> None:
    model.set_weights(state.weights)
    # Slots exist only once the optimizer is built; build, then overwrite with the saved values.
    model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    if len(variables) != len(state.optimizer):
        raise ValueError(f"checkpoint has {len(state.optimizer)} optimizer variables, the optimizer {len(variables)}")
    for variable, value in zip(variables, state.optimizer):
        variable.assign(value)


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
            _restore(model, state)
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
            state.history.append(row)
            state.epochs_done = epoch + 1
            score = row.get("val_accuracy", -1.0)
            if rank == 0 and (score > state.best_val_accuracy or not has_val):
                state.best_epoch, state.best_val_accuracy = epoch + 1, score
                state.best_weights = self.model.get_weights()
            if train.patience:
                # Rank 0 alone sees val; every worker must stop at the same step or allreduce hangs.
                stop = epoch + 1 - state.best_epoch >= train.patience if rank == 0 else False
                state.stopped_early = self.model.stop_training = bool(
                    broadcast_from_rank_zero(stop))
            self._report(row)

        def _report(self, row: dict[str, float]) -> None:
            if rank != 0:
                ray.train.report(row)
                return
            state.weights = self.model.get_weights()
            state.optimizer = [np.asarray(v.numpy()) for v in self.model.optimizer.variables]
            with tempfile.TemporaryDirectory(prefix="ferray-head-") as folder:
                state.save(folder)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))

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


@dataclass
class TrainResult:
    """What a training run produced; also written as MODEL_OUT/metrics.json."""

    model_out: str
    run_name: str
    checkpoints: str
    backbone: str | None
    input_dim: int
    rows: dict[str, int]
    # labelled rows per split and class, in LABELS order
    counts: dict[str, list[int]]
    skipped: dict[str, int]
    epochs_run: int
    best_epoch: int
    val_accuracy: float | None
    test_accuracy: float | None
    # epochs already done at each start of the workers ([0] clean; [0, k] resumed after epoch k)
    starts: list[int]
    stopped_early: bool
    seconds: float
    seconds_per_epoch: float
    head: dict[str, Any]
    train: dict[str, Any]
    data_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return render_training(self.to_dict())


def render_training(data: dict[str, Any]) -> str:
    """The one-screen summary of a training run, head or fine-tune."""
    rows = ", ".join(f"{k} {v}" for k, v in data["rows"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in data["skipped"].items() if v) or "none"
    return "\n".join([
        f"ferray train: {data['model_out']}   time: {data['seconds']:.1f} s ({data['seconds_per_epoch']:.2f} s/epoch)",
        f"  rows: {rows}; skipped: {skipped}",
        f"  epochs run: {data['epochs_run']} (best {data['best_epoch']}, starts {data['starts']})",
        f"  val accuracy {percent(data['val_accuracy'])}, test accuracy {percent(data['test_accuracy'])}",
        f"  model: {data['model_out']}/model.keras + ferray.json",
    ])


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run_name(data: TrainData, head_settings: HeadSettings, train: TrainSettings) -> str:
    """Stable per job: same data and recipe -> same name -> Ray Train resumes its checkpoints."""
    if train.run_name:
        return train.run_name
    key = json.dumps({"data": data.fingerprint, "head": head_settings.model_dump(mode="json"),
                      "train": train.recipe()}, sort_keys=True)
    return f"ferray-head-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _run_config(name: str, checkpoints: str, train: TrainSettings, storage: StorageSettings,
                legacy_keras: bool = True) -> Any:
    import ray.train

    filesystem, path = _arrow_fs(checkpoints, storage)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        # Every checkpoint holds the best weights so far, so the latest two are all a resume needs.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        # tf.keras must mean tf_keras from the first import in a worker, not only after Ray's setup.
        # (The fine-tune's workers run Keras 3: legacy_keras=False.)
        # And the driver's quiet TensorFlow settings (none at DEBUG); Ray merges these over the job's env_vars.
        worker_runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1" if legacy_keras else "0", **logs.worker_env()}},
    )


def _fit(
    data: TrainData,
    train_rows: pa.Table,
    val: tuple[np.ndarray, np.ndarray],
    head_settings: HeadSettings,
    train: TrainSettings,
    run_config: Any,
    epoch_hook: EpochHook | None,
) -> TrainState:
    import ray
    import ray.data
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    weights = head.class_weights(data.counts["train"], train.class_weight)
    config = {
        "head": head_settings.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        # One copy in the object store, fetched by rank 0 only.
        "val": ray.put(val) if len(val[1]) else None,
        "class_weight": None if weights is None else weights.tolist(),
        "epoch_hook": epoch_hook,
    }
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1.0} if train.use_gpu else {})
    trainer = TensorflowTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        # Each worker reads its share of the blocks through get_dataset_shard("train").
        datasets={"train": ray.data.from_arrow(train_rows)},
    )
    with _report_interval(train.report_interval_s):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_config.name} reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        return TrainState.load(folder)


@contextlib.contextmanager
def _report_interval(seconds: float) -> Iterator[None]:
    """Let the Train controller poll workers every `seconds` for this run.

    Each worker's report queue holds one result and the controller takes one per poll (every 2 s
    by default), so epochs shorter than the poll interval would wait on `ray.train.report`. Ray
    propagates this variable from the driver to the controller it starts; a value the user set wins.
    """
    if _POLL_ENV in os.environ:
        yield
        return
    os.environ[_POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(_POLL_ENV, None)


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

    `settings` is the settings tree (its `storage` and `ray` sections; `head` and `train` too once
    they live there); `head_settings` / `train` override those sections.
    """
    from ferray.runtime import ensure_ray

    head_settings = head_settings or settings.head
    train = train or settings.train
    storage: StorageSettings = settings.storage.resolved()
    ray_settings: RaySettings = settings.ray
    started = time.perf_counter()

    data = scan(source, storage)
    if sum(data.counts["train"]) < train.workers:
        raise InputError(f"{sum(data.counts['train'])} labelled train rows in {source}, fewer than the "
                         f"{train.workers} workers (rows by split: {data.counts}, skipped: {data.skipped})")
    name = run_name(data, head_settings, train)
    checkpoints = train.checkpoints or io.join(model_out, CHECKPOINTS)
    finished = _finished(model_out, name, storage)
    if finished is not None:
        log.info("train: %s already finished in %s; nothing to do", name, model_out)
        return finished
    log.info("train: run %s, rows %s, skipped %s", name, {k: sum(v) for k, v in data.counts.items()}, data.skipped)

    ensure_ray(ray_settings)
    splits = read_splits(data, storage)
    val, test = to_numpy([splits["val"]]), to_numpy([splits["test"]])
    run_config = _run_config(name, checkpoints, train, storage)
    state = _fit(data, splits["train"], val, head_settings, train, run_config, epoch_hook)
    best = state.best_weights or state.weights
    seconds = time.perf_counter() - started
    trained = [row["seconds"] for row in state.history]
    result = TrainResult(
        model_out=model_out,
        run_name=name,
        checkpoints=io.join(checkpoints, name),
        backbone=data.backbone,
        input_dim=int(best[0].shape[0]),
        rows={k: sum(v) for k, v in data.counts.items()},
        counts=data.counts,
        skipped=data.skipped,
        epochs_run=state.epochs_done,
        best_epoch=state.best_epoch,
        val_accuracy=_evaluate(best, *val),
        test_accuracy=_evaluate(best, *test),
        starts=state.starts,
        stopped_early=state.stopped_early,
        seconds=round(seconds, 2),
        seconds_per_epoch=round(float(np.median(trained)), 3) if trained else 0.0,
        head=head_settings.model_dump(mode="json"),
        train=train.model_dump(mode="json"),
        data_fingerprint=data.fingerprint,
    )
    _write_outputs(model_out, best, state, result, settings, storage)
    log.info("train: best epoch %d, val %.4f, test %s, %.1fs", result.best_epoch, result.val_accuracy or float("nan"),
             result.test_accuracy, seconds)
    return result


def _write_outputs(model_out: str, best: list[np.ndarray], state: TrainState, result: TrainResult,
                   settings: Any, storage: StorageSettings) -> None:
    """Weights, history, the run's settings, then metrics last: metrics.json marks the run finished."""
    io.write_bytes_atomic(io.join(model_out, HEAD_FILE), head.weights_to_npz(best), storage)
    io.write_json(io.join(model_out, HISTORY_FILE), state.history, storage)
    io.write_json(io.join(model_out, io.META, "train.json"),
                  {"summary": result.to_dict(), "settings": settings.public_dict()}, storage)
    io.write_json(io.join(model_out, METRICS_FILE), result.to_dict(), storage)


def _finished(model_out: str, name: str, storage: StorageSettings) -> TrainResult | None:
    uri = io.join(model_out, METRICS_FILE)
    if not io.exists(uri, storage):
        return None
    metrics = io.read_json(uri, storage)
    return TrainResult(**metrics) if metrics.get("run_name") == name else None


def load_head_weights(model_out: str, storage: StorageSettings) -> list[np.ndarray]:
    """The best-on-val head weights a run wrote to MODEL_OUT (for the artifact builder)."""
    return head.weights_from_npz(io.read_bytes(io.join(model_out, HEAD_FILE), storage))
