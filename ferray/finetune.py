"""Fine-tuning the backbone on aligned faces: augmentation, unfreezing, schedule (backend-agnostic Keras 3).

The frozen path embeds each face once and trains a head; this module adapts the backbone itself to
faces, once, so later frozen heads inherit face features. It is plain Keras 3 (no Ray, no
TensorFlow-only calls), so the same code runs in a Ray Train worker on TensorFlow and on a GPU box
under JAX; the result is saved as an ordinary ferray model (backbone + head in one `keras.Model`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import keras
import numpy as np

from ferray.config import FineTuneSettings
from ferray.schema import LABELS

log = logging.getLogger(__name__)

# Block-name prefixes of Lite0/B0 in execution order; `top` is the 1×1 conv before pooling.
N_BLOCKS = 16


# The recipe is `ferray.config.FineTuneSettings`; every field is recorded in the artifact's ferray.json.
FineTuneRecipe = FineTuneSettings


def augmentation(recipe: FineTuneRecipe) -> keras.Sequential:
    """Train-time-only image augmentation on raw 0..255 faces."""
    layers: list[keras.layers.Layer] = []
    if recipe.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=recipe.seed))
    if recipe.shift:
        layers.append(keras.layers.RandomTranslation(recipe.shift, recipe.shift, fill_mode="reflect", seed=recipe.seed))
    if recipe.rotation_deg:
        layers.append(keras.layers.RandomRotation(recipe.rotation_deg / 360.0, fill_mode="reflect", seed=recipe.seed))
    if recipe.zoom:
        layers.append(keras.layers.RandomZoom((-recipe.zoom, recipe.zoom), fill_mode="reflect", seed=recipe.seed))
    if recipe.erasing:
        layers.append(keras.layers.RandomErasing(factor=recipe.erasing, scale=(0.02, 0.2), value_range=(0, 255), seed=recipe.seed))
    return keras.Sequential(layers, name="augment")


def unfreeze(backbone: keras.Model, how: int | Literal["all"]) -> int:
    """Make the top `how` blocks (and the final conv) trainable; returns trainable weight count."""
    backbone.trainable = True
    if how != "all":
        top = set(blocks(backbone)[N_BLOCKS - int(how):]) if int(how) else set()
        for layer in _all_layers(backbone):
            keep = layer.name.startswith("top") or layer.name.split("_")[0] in top
            layer.trainable = keep or not layer.weights
    return int(sum(np.prod(w.shape) for w in backbone.trainable_weights))


def blocks(backbone: keras.Model) -> list[str]:
    """The MBConv block prefixes in execution order: Lite0 `block0`…`block15`, Keras B0 `block1a`…`block7a`."""
    seen: dict[str, None] = {}
    for layer in _all_layers(backbone):
        prefix = layer.name.split("_")[0]
        if prefix.startswith("block"):
            seen.setdefault(prefix, None)
    if len(seen) != N_BLOCKS:
        raise ValueError(f"expected {N_BLOCKS} MBConv blocks in the backbone, found {len(seen)}")
    return list(seen)


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out = []
    for layer in model.layers:
        out += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def classifier(backbone: keras.Model, recipe: FineTuneRecipe) -> keras.Model:
    """Inference model: face → backbone → head → 7 probabilities, laid out as every ferray model is
    (layers `backbone` and `head`), so evaluate's t-SNE and reuse of the backbone work unchanged."""
    from ferray.head import build_head

    inputs = keras.Input(shape=backbone.input_shape[1:], name="face")
    head = build_head(keras, int(backbone.output_shape[-1]), recipe.hidden, recipe.dropout)
    return keras.Model(inputs, head(backbone(inputs)), name="ferray")


def warmup_cosine(recipe: FineTuneRecipe, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total - 1, recipe.warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=recipe.learning_rate / 10, decay_steps=total - warmup, alpha=0.0,
        warmup_target=recipe.learning_rate, warmup_steps=warmup,
    )


def training_model(model: keras.Model, recipe: FineTuneRecipe, steps_per_epoch: int) -> keras.Model:
    """The classifier behind the augmentation, compiled with AdamW, the schedule and label smoothing."""
    inputs = keras.Input(shape=model.input_shape[1:], name="face")
    augment = augmentation(recipe)
    trainer = keras.Model(inputs, model(augment(inputs) if augment.layers else inputs), name="ferray_finetune")
    trainer.compile(
        optimizer=keras.optimizers.AdamW(warmup_cosine(recipe, steps_per_epoch), weight_decay=recipe.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    return trainer


class TimeBudget(keras.callbacks.Callback):
    """Stops after the epoch that crosses a wall-clock budget (a lent GPU has minutes, not hours)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started = 0.0

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        elapsed = time.perf_counter() - self.started
        # Stop when one more epoch would cross the budget.
        if elapsed * (epoch + 2) / (epoch + 1) > self.seconds:
            log.warning("time budget %.0f s reached after epoch %d", self.seconds, epoch + 1)
            self.model.stop_training = True


class KeepBest(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best validation accuracy (selection on val only)."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.target, self.best, self.best_epoch, self.weights = model, -1.0, -1, None

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        accuracy = float((logs or {}).get("val_accuracy", -1.0))
        if accuracy > self.best:
            self.best, self.best_epoch, self.weights = accuracy, epoch, self.target.get_weights()


def fit(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    recipe: FineTuneRecipe,
    callbacks: list[keras.callbacks.Callback] | None = None,
    initial_epoch: int = 0,
) -> dict[str, Any]:
    """Train end to end; restores the best-on-val weights into `model` and returns the history."""
    x_train, y_train = train
    steps = math.ceil(len(x_train) / recipe.batch_size)
    trainer = training_model(model, recipe, steps)
    best = KeepBest(model)
    history = trainer.fit(
        x_train, keras.utils.to_categorical(y_train, len(LABELS)),
        validation_data=(val[0], keras.utils.to_categorical(val[1], len(LABELS))),
        batch_size=recipe.batch_size, epochs=recipe.epochs, initial_epoch=initial_epoch, shuffle=True,
        callbacks=[best, *(callbacks or [])], verbose=2,
    )
    if best.weights is not None:
        model.set_weights(best.weights)
    return {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "best_val_accuracy": best.best, "best_epoch": best.best_epoch + 1}


def predict_tta(model: keras.Model, faces: np.ndarray, batch_size: int = 256, flip: bool = True) -> np.ndarray:
    """Class probabilities, averaged with the horizontally flipped face when `flip` (test-time augmentation)."""
    probs = model.predict(faces, batch_size=batch_size, verbose=0)
    if flip:
        probs = (probs + model.predict(faces[:, :, ::-1], batch_size=batch_size, verbose=0)) / 2.0
    return np.asarray(probs)
