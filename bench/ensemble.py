"""What averaging models would give: each model's and the mean's accuracy on PublicTest and PrivateTest.

Usage: .venv/bin/python bench/ensemble.py ALIGNED_FER2013 MODEL [MODEL ...] [--no-tta]
MODEL is `default` or a model folder. Every model scores with flip TTA (or, with --no-tta, once: two
models then cost what one costs with TTA) and no temperature (the argmax does not depend on it); the
ensemble is the plain mean of their probabilities, chosen on nothing, so its PrivateTest figure is as
clean as its PublicTest one. Also prints the wall ms per face of scoring
PrivateTest with all CPUs (as loaded as the machine is: not the one-core cost `bench/ship_model.py` measures).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from ferray.config import StorageSettings
from ferray.model import artifact as artifacts
from ferray.training import tune

log = logging.getLogger("ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("aligned")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--no-tta", action="store_true", help="score each model once, without the flipped copy")
    args = parser.parse_args()
    storage = StorageSettings()
    faces = tune.load_faces(args.aligned, storage, 48, 1)[0]
    probs: dict[str, dict[str, np.ndarray]] = {}
    report: dict[str, dict[str, float]] = {}
    for name in args.models:
        model = artifacts.load(str(artifacts.default_model_dir()) if name == "default" else name, storage)
        model.meta["inference"] = {"flip_tta": not args.no_tta, "temperature": 1.0}
        probs[name] = {}
        for split in ("val", "test"):
            started = time.perf_counter()
            probs[name][split] = model.predict(faces[split].x.astype(np.float32))
            seconds = time.perf_counter() - started
        report[name] = {split: float((p.argmax(1) == faces[split].y).mean()) for split, p in probs[name].items()}
        report[name]["wall_ms_per_face"] = 1000 * seconds / len(faces["test"].y)
    if len(args.models) > 1:
        report["mean"] = {split: float((np.mean([probs[m][split] for m in args.models], axis=0).argmax(1)
                                        == faces[split].y).mean()) for split in ("val", "test")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
