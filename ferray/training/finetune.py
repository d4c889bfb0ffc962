"""Fine-tuning the backbone on aligned faces: augmentation, unfreezing, schedule (backend-agnostic Keras 3).

The frozen path embeds each face once and trains a head; this module adapts the backbone itself to
faces, once, so later frozen heads inherit face features. It is plain Keras 3 (no Ray, no
TensorFlow-only calls), so the same code runs in a Ray Train worker on TensorFlow and on a GPU box
under JAX; the result is saved as an ordinary ferray model (backbone + head in one `keras.Model`).
"""

from __future__ import annotations

import logging
import math
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


class MixedBatches(keras.utils.PyDataset):
    """Shuffled training batches as (float faces, soft labels, per-face loss weights), a share of them
    mixed by MixUp or CutMix. With `soft` (the teachers' probabilities, distillation) a face's label is
    (1 - recipe.distill) x its one-hot label + recipe.distill x its row of `soft`, before mixing.

    Mixing lives here, in numpy and outside the differentiated graph: it must mix the labels in the
    same proportion as the faces, which an augmentation layer inside the model cannot, and under JAX
    augmentation inside the traced step made each step 10-12 s. The shuffle is a function of the seed
    and the epoch, so a resumed run sees the order an uninterrupted one would.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, recipe: FineTuneSettings, n_classes: int,
                 class_weight: np.ndarray | None = None, first_epoch: int = 0, soft: np.ndarray | None = None) -> None:
        super().__init__()
        self.x, self.y, self.recipe, self.n_classes = x, y.astype(np.int64), recipe, n_classes
        if soft is not None and soft.shape != (len(self.y), n_classes):
            raise ValueError(f"soft labels of shape {soft.shape} for {len(self.y)} faces and {n_classes} classes")
        self.soft = None if soft is None else np.asarray(soft, np.float32)
        self.class_weight = None if class_weight is None else np.asarray(class_weight, np.float32)
        self.epoch = first_epoch
        self._order()

    def _order(self) -> None:
        self.rng = np.random.default_rng([self.recipe.seed, self.epoch])
        self.order = self.rng.permutation(len(self.y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.recipe.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order()

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.order[index * self.recipe.batch_size:(index + 1) * self.recipe.batch_size]
        x = self.x[rows].astype(np.float32)
        y = np.eye(self.n_classes, dtype=np.float32)[self.y[rows]]
        if self.soft is not None:
            y = (1.0 - self.recipe.distill) * y + self.recipe.distill * self.soft[rows]
        rng = np.random.default_rng([self.recipe.seed, self.epoch, index])
        kind = mix_kind(self.recipe, rng)
        if kind is not None:
            x, y = mix(x, y, kind, self.recipe.mixup if kind == "mixup" else self.recipe.cutmix, rng)
        weights = np.ones(len(rows), np.float32) if self.class_weight is None else y @ self.class_weight
        return x, y, weights


def mix_kind(recipe: FineTuneSettings, rng: np.random.Generator) -> Literal["mixup", "cutmix"] | None:
    """Which mix a batch gets: none with probability 1 - mix_prob, else MixUp or CutMix (even odds if both are on)."""
    kinds: list[Literal["mixup", "cutmix"]] = [k for k in ("mixup", "cutmix") if getattr(recipe, k) > 0]
    if not kinds or rng.random() >= recipe.mix_prob:
        return None
    return kinds[int(rng.integers(len(kinds)))]


def mix(x: np.ndarray, y: np.ndarray, kind: Literal["mixup", "cutmix"], alpha: float,
        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with a shuffled copy of itself;
    the labels are mixed by the share of each face actually kept."""
    partner = rng.permutation(len(x))
    lam = float(rng.beta(alpha, alpha))
    if kind == "mixup":
        return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]
    height, width = x.shape[1:3]
    cut_h, cut_w = int(round(height * math.sqrt(1 - lam))), int(round(width * math.sqrt(1 - lam)))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    x = x.copy()
    x[:, top:bottom, left:right] = x[partner, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return x, kept * y + (1 - kept) * y[partner]


def averaged_weights(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> list[np.ndarray]:
    """The model's weights with each trainable one replaced by its exponential moving average
    (batch-norm statistics stay as they are). The same private slots SwapEMAWeights reads."""
    averages = {id(v): a for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
    return [np.asarray(keras.ops.convert_to_numpy(averages.get(id(v), v))) for v in model.weights]


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
    from ferray.model.head import build_head

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
    ema = {"use_ema": True, "ema_momentum": recipe.ema} if recipe.ema else {}
    trainer.compile(
        optimizer=keras.optimizers.AdamW(warmup_cosine(recipe, steps_per_epoch), weight_decay=recipe.weight_decay, **ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    return trainer
