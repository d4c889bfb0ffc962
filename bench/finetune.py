"""Fine-tune a backbone on aligned FER-2013 faces (ferray.training.finetune), anywhere Keras 3 runs.

  pack:  .venv/bin/python bench/finetune.py pack ALIGNED_SHARDS PACK.npz [--quality 90]
         aligned faces → one compact .npz (JPEG bytes + labels + splits) to move to a GPU box.
  train: python bench/finetune.py train PACK.npz OUT/ --weights LITE0.npz [--size 112 --epochs 40 …]
         trains on `train`, selects on `val` (never `test`), writes OUT/weights.npz + OUT/history.json.
         Runs under any Keras backend (KERAS_BACKEND=jax on a GPU box without TensorFlow).
  eval:  .venv/bin/python bench/finetune.py eval ALIGNED_SHARDS OUT/ [--split test]
         rebuilds the model here, loads OUT/weights.npz, prints accuracy / macro-F1 (with and without flip TTA).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ferray.training import finetune
from ferray.config import FineTuneSettings
from ferray.data.schema import LABELS

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# -- the plain Keras loop this script runs where Ray Train is absent (a JAX GPU box) --------------
# `ferray train --fine-tune` (ferray.training.tune) does the same inside a Ray Train worker, with checkpoints.


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
    recipe: FineTuneSettings,
    callbacks: list[keras.callbacks.Callback] | None = None,
    initial_epoch: int = 0,
) -> dict[str, Any]:
    """Train end to end; restores the best-on-val weights into `model` and returns the history."""
    x_train, y_train = train
    steps = math.ceil(len(x_train) / recipe.batch_size)
    trainer = finetune.training_model(model, recipe, steps)
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


def pack(args: argparse.Namespace) -> None:
    import cv2

    from ferray.data import io
    from ferray.config import StorageSettings

    storage = StorageSettings().resolved()
    table = io.read_table(io.completed_shards(args.aligned, storage), storage, ["face", "label", "split"])
    faces, labels, splits = table["face"].to_pylist(), table["label"].to_pylist(), table["split"].to_pylist()
    keep = [i for i, (label, split) in enumerate(zip(labels, splits)) if label is not None and split in args.splits]
    blobs = []
    for i in keep:
        grey = cv2.imdecode(np.frombuffer(faces[i], np.uint8), cv2.IMREAD_GRAYSCALE)
        blobs.append(cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, args.quality])[1].tobytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(args.pack, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             labels=np.array([labels[i] for i in keep], np.int8), splits=np.array([splits[i] for i in keep]))
    print(f"packed {len(keep)} faces ({', '.join(args.splits)}) into {args.pack}: {Path(args.pack).stat().st_size / 1e6:.1f} MB")


def load_pack(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    data = np.load(path)
    chosen = np.flatnonzero(data["splits"] == split)
    jpeg, offsets = data["jpeg"], data["offsets"]
    faces = np.stack([cv2.imdecode(jpeg[offsets[i] : offsets[i + 1]], cv2.IMREAD_GRAYSCALE) for i in chosen])
    return faces[..., None].astype(np.float32), data["labels"][chosen].astype(np.int64)


def build(size: int, weights: str, recipe) -> tuple[object, object]:
    from ferray.model.backbones import build_backbone
    from ferray.config import BackboneSettings

    settings = BackboneSettings(name="efficientnet-lite0", input_size=size, channels=1, weights=weights)
    backbone = build_backbone(settings, image_size=48)
    trainable = finetune.unfreeze(backbone, recipe.unfreeze)
    logging.info("trainable backbone parameters: %d", trainable)
    return finetune.classifier(backbone, recipe), settings


def train(args: argparse.Namespace) -> None:
    if args.weights.endswith(".npz"):  # a float16 copy travels light; the model wants float32
        arrays = dict(np.load(args.weights))
        args.weights = str(Path(tempfile.mkdtemp()) / "init-weights.npz")
        np.savez(args.weights, **{k: v.astype(np.float32) for k, v in arrays.items()})
    recipe = FineTuneSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                              unfreeze="all" if args.unfreeze == "all" else int(args.unfreeze),
                              label_smoothing=args.label_smoothing, hidden=args.hidden, dropout=args.dropout)
    model, _ = build(args.size, args.weights, recipe)
    x_train, y_train = load_pack(args.pack, "train")
    x_val, y_val = load_pack(args.pack, "val")
    if args.limit:
        x_train, y_train, x_val, y_val = x_train[: args.limit], y_train[: args.limit], x_val[: args.limit], y_val[: args.limit]
    started = time.perf_counter()
    budget = [TimeBudget(args.time_budget_s)] if args.time_budget_s else []
    result = fit(model, (x_train, y_train), (x_val, y_val), recipe, callbacks=budget)
    probs = predict_tta(model, x_val)
    result.update({"seconds": time.perf_counter() - started, "size": args.size, "recipe": recipe.model_dump(mode="json"),
                   "val_accuracy_tta": float((probs.argmax(1) == y_val).mean()), "train_rows": len(x_train)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "weights.npz", *model.get_weights())
    (out / "history.json").write_text(json.dumps(result, indent=1))
    print(f"best val accuracy {result['best_val_accuracy']:.4f} at epoch {result['best_epoch']}, "
          f"with flip TTA {result['val_accuracy_tta']:.4f}; {result['seconds']:.0f} s")


def evaluate(args: argparse.Namespace) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    from ferray.data import io
    from ferray.config import StorageSettings
    import cv2

    history = json.loads((Path(args.out) / "history.json").read_text())
    recipe = FineTuneSettings(**history["recipe"])
    model, _ = build(history["size"], "none", recipe)
    stored = np.load(Path(args.out) / "weights.npz")
    model.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
    storage = StorageSettings().resolved()
    table = io.read_table(io.completed_shards(args.aligned, storage), storage, ["face", "label", "split"])
    rows = [(f, l) for f, l, s in zip(table["face"].to_pylist(), table["label"].to_pylist(), table["split"].to_pylist())
            if s == args.split and l is not None]
    x = np.stack([cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_GRAYSCALE) for f, _ in rows])[..., None].astype(np.float32)
    y = np.array([l for _, l in rows])
    for flip in (False, True):
        started = time.perf_counter()
        pred = predict_tta(model, x, flip=flip).argmax(1)
        rate = len(x) * (2 if flip else 1) / (time.perf_counter() - started)
        print(f"{args.split} ({len(y)} faces) flip_tta={flip}: accuracy {accuracy_score(y, pred):.4f}, "
              f"macro-F1 {f1_score(y, pred, average='macro'):.4f}; {rate:.0f} face-passes/s")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("aligned")
    p.add_argument("pack")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.set_defaults(run=pack)
    t = sub.add_parser("train")
    t.add_argument("pack")
    t.add_argument("out")
    t.add_argument("--weights", required=True, help="Lite0 ImageNet weights (.npz converted or .pth)")
    t.add_argument("--size", type=int, default=112)
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--unfreeze", default="all")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--dropout", type=float, default=0.3)
    t.add_argument("--limit", type=int, default=0, help="first N rows only (smoke tests)")
    t.add_argument("--time-budget-s", type=float, default=0, help="stop after the epoch that would cross it")
    t.set_defaults(run=train)
    e = sub.add_parser("eval")
    e.add_argument("aligned")
    e.add_argument("out")
    e.add_argument("--split", default="test")
    e.set_defaults(run=evaluate)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
