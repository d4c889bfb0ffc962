"""A confidence cascade (`ferray.model.cascade`) against the whole model: accuracy, share sent on, CPU a face.

Usage:
  .venv/bin/python bench/cascade.py MODEL ALIGNED [--max-drops 0.003 0.001 0] [--member N]

MODEL: an ensemble folder whose ferray.json names a cascade (`python -m ferray.model.cascade MODEL ALIGNED`)
and whose calibration.npz calibrates the member's int8 graph. For each allowed val drop, the margin is
fitted on ALIGNED's val as `ferray.model.cascade.fit` does, then val and test accuracy, the share of faces
sent through the whole float graph, and CPU ms a face on one thread (batches of 256, after a warm-up) of
the cascade and of the whole float graph.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from ferray.config import load_settings
from ferray.data import io
from ferray.model import artifact, cascade, lite
from ferray.model.ensemble import MEMBER_PREFIX
from ferray.training import tune

log = logging.getLogger("bench.cascade")


def cpu_ms(predict, faces: np.ndarray) -> float:
    predict(faces[:256])
    started = time.process_time()
    predict(faces[:1024])
    return 1000 * (time.process_time() - started) / len(faces[:1024])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("aligned")
    parser.add_argument("--max-drops", nargs="+", type=float, default=[0.003, 0.002, 0.001, 0.0])
    parser.add_argument("--member", type=int, help="default: the one ferray.json names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    storage = load_settings().storage.resolved()
    meta = io.read_json(io.join(args.model, artifact.META_FILE), storage)
    chosen = cascade.Cascade.from_meta(meta)
    member = args.member if args.member is not None else (chosen.member if chosen else 0)
    faces, _, _ = tune.load_faces(args.aligned, storage, int(meta.get("face_size", 48)), 1)
    whole = lite.LiteModel(lite.export(args.model, storage, "float32"), meta, storage)
    first = lite.LiteModel(lite.export(f"{args.model}#{MEMBER_PREFIX}{member}", storage, "int8"), meta, storage)
    x = {s: faces[s].x.astype(np.float32) for s in ("val", "test")}
    y = {s: faces[s].y for s in ("val", "test")}
    full = {s: whole.predict(x[s]) for s in x}
    passed = {s: cascade.first_pass(first.raw(x[s]), meta["inference"]) for s in x}
    print(f"{args.model}: member {member} in int8 first ({faces['train'].x.shape[0]} train faces not used here)")
    print(f"whole float32: val {(full['val'].argmax(1) == y['val']).mean():.2%}, test "
          f"{(full['test'].argmax(1) == y['test']).mean():.2%}; {cpu_ms(whole.predict, x['test']):.2f} CPU ms a face")
    print(f"member alone (int8, the ensemble's recipe): val {(passed['val'].argmax(1) == y['val']).mean():.2%}, test "
          f"{(passed['test'].argmax(1) == y['test']).mean():.2%}; {cpu_ms(first.raw, x['test']):.2f} CPU ms a face")
    for drop in args.max_drops:
        fitted = cascade.fit(passed["val"], full["val"], y["val"], drop)
        model = lite.CascadeModel(first, whole, fitted.margin)
        test = model.predict(x["test"])
        sent = float((cascade.margins(passed["test"]) < fitted.margin).mean())
        print(f"max drop {100 * drop:.1f} points: margin {fitted.margin:.3f}; val {fitted.accuracy:.2%} "
              f"({100 * fitted.escalated:.1f}% sent on), test {(test.argmax(1) == y['test']).mean():.2%} "
              f"({100 * sent:.1f}% sent on), agreement with the whole model on test "
              f"{(test.argmax(1) == full['test'].argmax(1)).mean():.2%}; {cpu_ms(model.predict, x['test']):.2f} CPU ms a face")


if __name__ == "__main__":
    main()
