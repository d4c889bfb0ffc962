"""Fine-tuning the backbone on aligned faces: augmentation, unfreezing, schedule (backend-agnostic Keras 3).

The frozen path embeds each face once and trains a head; this module adapts the backbone itself to
faces, once, so later frozen heads inherit face features. It is plain Keras 3 (no Ray, no
TensorFlow-only calls), so the same code runs in a Ray Train worker on TensorFlow and on a GPU box
under JAX; the result is saved as an ordinary ferray model (backbone + head in one `keras.Model`).
"""

from __future__ import annotations

import logging
from typing import Literal

import keras
import numpy as np

from ferray.config import FineTuneSettings

log = logging.getLogger(__name__)

# Block-name prefixes of Lite0/B0 in execution order; `top` is the 1×1 conv before pooling.
N_BLOCKS = 16


def augmentation(recipe: FineTuneSettings) -> keras.Sequential:
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


def classifier(backbone: keras.Model, recipe: FineTuneSettings) -> keras.Model:
    """Inference model: face → backbone → head → 7 probabilities, laid out as every ferray model is
    (layers `backbone` and `head`), so evaluate's t-SNE and reuse of the backbone work unchanged."""
    from ferray.head import build_head

    inputs = keras.Input(shape=backbone.input_shape[1:], name="face")
    head = build_head(keras, int(backbone.output_shape[-1]), recipe.hidden, recipe.dropout)
    return keras.Model(inputs, head(backbone(inputs)), name="ferray")


def warmup_cosine(recipe: FineTuneSettings, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total - 1, recipe.warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=recipe.learning_rate / 10, decay_steps=total - warmup, alpha=0.0,
        warmup_target=recipe.learning_rate, warmup_steps=warmup,
    )


def training_model(model: keras.Model, recipe: FineTuneSettings, steps_per_epoch: int) -> keras.Model:
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
