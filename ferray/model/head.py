"""The expression head on frozen embeddings: definition, recipe (optimizer, schedule, loss), weight I/O.

Every builder takes the Keras module as an argument, so the same code makes the head with `tf_keras`
inside Ray Train workers (the only Keras whose `fit` runs under MultiWorkerMirroredStrategy) and with
Keras 3 for the shipped artifact. Weights travel between the two as a list of numpy arrays.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np

from ferray.config import TrainSettings
from ferray.data.schema import LABELS

HEAD_NAME = "head"
# Fixed layer names: weights are matched by position, names make a mismatch readable.
HIDDEN, DROPOUT, OUTPUT = "head_hidden", "head_dropout", "head_probs"


def build_head(
    keras_module: ModuleType, input_dim: int, hidden: int, dropout: float, n_classes: int = len(LABELS)
) -> Any:
    """The paper's head as a functional model of `keras_module` (`tf_keras` or `keras`), named `head`."""
    layers = keras_module.layers
    inputs = keras_module.Input(shape=(input_dim,), name="embedding")
    x = layers.Dense(hidden, activation="relu", name=HIDDEN)(inputs)
    x = layers.Dropout(dropout, name=DROPOUT)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name=OUTPUT)(x)
    return keras_module.Model(inputs, outputs, name=HEAD_NAME)


def head_from_weights(keras_module: ModuleType, weights: Sequence[np.ndarray], dropout: float = 0.0) -> Any:
    """Rebuild a head from its weight list alone: the shapes give input size, hidden size and classes."""
    kernel, _, out_kernel, _ = weights
    model = build_head(keras_module, kernel.shape[0], kernel.shape[1], dropout, out_kernel.shape[1])
    model.set_weights(list(weights))
    return model


# -- the recipe ------------------------------------------------------------------------------------


def learning_rate(train: TrainSettings, epoch: int) -> float:
    """The learning rate of a (0-based) epoch; a pure function of the epoch, so a resumed run matches."""
    base = train.learning_rate
    if train.schedule == "step":
        # The paper: "a decay of 10% after every 10 epochs".
        return base * train.decay_rate ** (epoch // train.decay_every)
    if train.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(epoch, train.epochs) / train.epochs))
    return base


def make_optimizer(keras_module: ModuleType, train: TrainSettings) -> Any:
    """The paper's SGD with momentum 0.9, or Adam; the rate is set per epoch from `learning_rate`."""
    rate = learning_rate(train, 0)
    if train.optimizer == "adam":
        return keras_module.optimizers.Adam(learning_rate=rate)
    return keras_module.optimizers.SGD(learning_rate=rate, momentum=train.momentum)


def compile_head(model: Any, keras_module: ModuleType, train: TrainSettings, **compile_args: Any) -> None:
    """Optimizer, loss (one-hot labels, so label smoothing is available) and an `accuracy` metric."""
    model.compile(
        optimizer=make_optimizer(keras_module, train),
        loss=keras_module.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=[keras_module.metrics.CategoricalAccuracy(name="accuracy")],
        **compile_args,
    )


def class_weights(
    counts: Sequence[int], mode: Literal["none", "balanced", "sqrt"]
) -> np.ndarray | None:
    """Per-class loss weights: `balanced` = n / (classes_present × count), as scikit-learn defines it;
    `sqrt` its square root, rescaled so the average face weighs 1 as well."""
    if mode == "none":
        return None
    counts_array = np.asarray(counts, dtype=np.float64)
    present = counts_array > 0
    weights = np.zeros(len(counts_array), dtype=np.float32)
    weights[present] = counts_array.sum() / (present.sum() * counts_array[present])
    if mode == "sqrt":
        weights = np.sqrt(weights)
        weights *= counts_array.sum() / float((weights * counts_array).sum())
    return weights.astype(np.float32)


def one_hot(labels: np.ndarray, n_classes: int = len(LABELS)) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[labels.astype(np.int64)]


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; NaN for no rows (a split that is absent, not a perfect score)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def predict(model: Any, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities of a head (either Keras), in eager batches without a `predict` trace."""
    parts = [np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


# -- weight files ----------------------------------------------------------------------------------


def apply_temperature(probs: np.ndarray, temperature: float, offsets: Sequence[float] | None = None) -> np.ndarray:
    """softmax((log p + b) / T): a temperature, after per-class offsets b, applied to probabilities
    (log p = logits + a constant).

    The one place inference scales confidences: the artifact applies its fitted T and offsets with it, and
    both are fitted (ferray.evaluate.calibration) through it."""
    shifted = offsets is not None and len(offsets) > 0
    if (temperature == 1.0 and not shifted) or len(probs) == 0:
        return np.asarray(probs, np.float64)
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    if shifted:
        logits = logits + np.asarray(offsets, np.float64)
    logits = logits / temperature
    scaled = np.exp(logits - logits.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def apply_recipe(probs: np.ndarray, inference: dict[str, Any]) -> np.ndarray:
    """An artifact's `inference` recipe (ferray.json) on its raw probabilities: class offsets, then temperature."""
    return apply_temperature(probs, float(inference.get("temperature", 1.0)), inference.get("class_offsets"))


def weights_to_npz(weights: Sequence[np.ndarray], **extra: np.ndarray) -> bytes:
    """A weight list (plus named extras) as npz bytes; positions are kept as `w000`, `w001` …"""
    buffer = io.BytesIO()
    arrays = {f"w{i:03d}": np.asarray(w) for i, w in enumerate(weights)}
    np.savez(buffer, **arrays, **extra)
    return buffer.getvalue()


def weights_from_npz(data: bytes, prefix: str = "w") -> list[np.ndarray]:
    """The weight list of `weights_to_npz`, in order (safe: no pickled objects)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        keys = sorted(k for k in archive.files if k[: len(prefix)] == prefix and k[len(prefix) :].isdigit())
        return [archive[k] for k in keys]
