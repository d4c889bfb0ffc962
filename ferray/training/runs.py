"""What every training run shares, head or fine-tune: its name, its checkpointed state, the Ray Train
run, the per-epoch report, the files it leaves in MODEL_OUT and the result it returns.

A run is named by a hash of its data and recipe, so rerunning the same command resumes the same Ray
Train run from its last checkpoint, and a finished run (MODEL_OUT/metrics.json with that name) is not
trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ferray import logs
from ferray.config import StorageSettings, TrainSettings
from ferray.data import io
from ferray.model import head

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "_checkpoints"
_STATE_NPZ, _STATE_JSON = "state.npz", "state.json"
_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

# Called on every worker at the start of each epoch with (world rank, 0-based epoch); a hook for
# fault drills and instrumentation. Must pickle (Ray ships it to the workers).
EpochHook = Callable[[int, int], None]


def run_name(kind: str, key: dict[str, Any]) -> str:
    """Stable per job: the same data and recipe give the same name, so Ray Train resumes its checkpoints."""
    return f"ferray-{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


# -- the state a checkpoint holds ------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a resumed run needs, and what the driver reads back from the last checkpoint."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 = none yet
    best_val_accuracy: float = -1.0
    stopped_early: bool = False
    # Why it stopped early: "patience" is final; "budget" is not, since a rerun may raise the time budget
    # (None in checkpoints written before the reason was kept: taken as final).
    stop_reason: str | None = None
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
        return self.epochs_done >= epochs or (self.stopped_early and self.stop_reason != "budget")

    def stop(self, reason: str) -> None:
        self.stopped_early, self.stop_reason = True, reason

    @property
    def seconds_spent(self) -> float:
        """Training seconds over every start of the run (the time budget counts these)."""
        return sum(row["seconds"] for row in self.history)

    def record(self, row: dict[str, float], best_weights: Callable[[], list[np.ndarray]], choose: bool = True) -> bool:
        """Append an epoch's row; keep `best_weights()` when its val accuracy is the best so far (or
        when there is no val to choose on). True when this epoch is the new best. `choose=False` (a
        worker that does not see val) only records the row."""
        self.history.append(row)
        self.epochs_done = int(row["epoch"])
        if not choose:
            return False
        score = row.get("val_accuracy")
        better = score is None or score > self.best_val_accuracy
        if better:
            self.best_epoch, self.best_val_accuracy = self.epochs_done, -1.0 if score is None else score
            self.best_weights = best_weights()
        return better


def restore_optimizer(optimizer: Any, variables: list[Any], saved: list[np.ndarray]) -> None:
    """Overwrite a built optimizer's slots (the step counter among them) with a checkpoint's values."""
    # Slots exist only once the optimizer is built, so build first; the schedule then resumes where it was.
    optimizer.build(variables)
    if len(optimizer.variables) != len(saved):
        raise ValueError(f"checkpoint has {len(saved)} optimizer variables, the optimizer {len(optimizer.variables)}")
    for variable, value in zip(optimizer.variables, saved):
        variable.assign(value)


def report(state: TrainState, row: dict[str, float], checkpoint: bool = True) -> None:
    """Report an epoch's row to Ray Train, with the state as this epoch's checkpoint."""
    import ray.train

    if not checkpoint:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory(prefix="ferray-train-") as folder:
        state.save(folder)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))


# -- the Ray Train run -----------------------------------------------------------------------------


def _arrow_fs(uri: str, storage: StorageSettings) -> tuple[Any, str]:
    """A pyarrow filesystem over ferray.data.io's fsspec one, for Ray Train's storage (None: local)."""
    if not io.is_remote(uri):
        return None, os.path.abspath(io.url_to_fs(uri, storage)[1])
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = io.url_to_fs(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def run_config(name: str, checkpoints: str, train: TrainSettings, storage: StorageSettings,
               legacy_keras: bool) -> Any:
    import ray.train

    filesystem, path = _arrow_fs(checkpoints, storage)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        # Every checkpoint holds the best weights so far, so the latest two are all a resume needs.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        # The head's workers run tf_keras (legacy Keras 2), which must be what `tf.keras` means from a
        # worker's first import, not only after Ray's set-up; the fine-tune's run Keras 3.
        worker_runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1" if legacy_keras else "0", **logs.worker_env()}},
    )


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


def fit(worker: Callable[[dict[str, Any]], None], config: dict[str, Any], name: str, checkpoints: str,
        train: TrainSettings, storage: StorageSettings, *, workers: int, legacy_keras: bool,
        datasets: dict[str, Any] | None = None) -> TrainState:
    """Run `worker` on `workers` Ray Train workers (resuming NAME's checkpoints) and return its last state."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1.0} if train.use_gpu else {})
    trainer = TensorflowTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=train.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config(name, checkpoints, train, storage, legacy_keras),
        datasets=datasets,
    )
    with _report_interval(train.report_interval_s):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        return TrainState.load(folder)


# -- the result ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run produced, head or fine-tune; also written as MODEL_OUT/metrics.json."""

    model_out: str
    run_name: str
    checkpoints: str
    rows: dict[str, int]
    skipped: dict[str, int]
    epochs_run: int
    best_epoch: int
    # epochs already done at each start of the workers ([0] clean; [0, k] resumed after epoch k)
    starts: list[int]
    stopped_early: bool
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float
    seconds_per_epoch: float
    data_fingerprint: str
    stage: str = "train"
    stop_reason: str | None = None  # "patience" or "budget" when stopped_early
    # The head's run: the backbone that made the embeddings, their size, labelled rows per split and
    # class (LABELS order), and its two sections of settings.
    backbone: str | None = None
    input_dim: int | None = None
    counts: dict[str, list[int]] | None = None
    head: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    # The fine-tune's run: scored with its inference settings (flip TTA, temperature fitted on val).
    val_macro_f1: float | None = None
    test_macro_f1: float | None = None
    flip_tta: bool | None = None
    temperature: float | None = None
    faces_per_s: float | None = None
    finetune: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("val_accuracy", "test_accuracy")}

    def render(self) -> str:
        """The one-screen summary of a training run."""
        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"
        return "\n".join([
            f"ferray train: {self.model_out}   time: {self.seconds:.1f} s ({self.seconds_per_epoch:.2f} s/epoch)",
            f"  rows: {rows}; skipped: {skipped}",
            f"  epochs run: {self.epochs_run} (best {self.best_epoch}, starts {self.starts})",
            f"  val accuracy {percent(self.val_accuracy)}, test accuracy {percent(self.test_accuracy)}",
            f"  model: {self.model_out}/model.keras + ferray.json",
        ])


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def median_epoch_seconds(state: TrainState) -> float:
    seconds = [row["seconds"] for row in state.history]
    return round(float(np.median(seconds)), 3) if seconds else 0.0


def finished(model_out: str, name: str, storage: StorageSettings) -> TrainResult | None:
    """The result of run NAME if MODEL_OUT holds it finished (its metrics.json is written last)."""
    from ferray.model.artifact import META_FILE

    uri = io.join(model_out, METRICS_FILE)
    if not io.exists(uri, storage):
        return None
    metrics = io.read_json(uri, storage)
    if metrics.get("run_name") != name:
        return None
    # A fine-tune writes its artifact itself; a head run's artifact is built from its outputs after.
    if metrics.get("finetune") is not None and not io.exists(io.join(model_out, META_FILE), storage):
        return None
    return TrainResult.from_dict(metrics)


def write_run_files(model_out: str, state: TrainState, result: TrainResult, settings: Any,
                    storage: StorageSettings) -> None:
    """History, the run's settings, then metrics last: metrics.json marks the run finished."""
    io.write_json(io.join(model_out, HISTORY_FILE), state.history, storage)
    io.write_json(io.join(model_out, io.META, "train.json"),
                  {"summary": result.to_dict(), "settings": settings.public_dict()}, storage)
    io.write_json(io.join(model_out, METRICS_FILE), result.to_dict(), storage)
