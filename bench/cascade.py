"""A model's confidence cascade (`ferray.model.cascade`) against its whole float32 LiteRT graph, as annotate
runs them: accuracy, macro-F1, agreement, share of faces each pass reached, and CPU ms a face.

Usage:
  .venv/bin/python bench/cascade.py MODEL ALIGNED [--batch 256] [--repeats 3]

MODEL: an ensemble whose ferray.json names a cascade (`python -m ferray.model.cascade MODEL ALIGNED`, or
`default`). Both run on one thread, on ALIGNED's val and test faces handed over `--batch` at a time (as
annotate hands over a shard's faces; each graph runs them in its own batches, `ferray.model.lite.BATCH`); CPU ms a face is the least of `--repeats` passes over test (after a warm-up),
measured with process time, so the machine's other load counts little.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

import numpy as np

from ferray.annotate.job import resolve_model
from ferray.config import load_settings
from ferray.evaluate.command import accuracy_and_macro_f1
from ferray.model import artifact, cascade, lite
from ferray.training import tune

log = logging.getLogger("bench.cascade")


def cpu_ms(predict: Callable[[np.ndarray], np.ndarray], faces: np.ndarray, batch: int, repeats: int) -> float:
    def over_all() -> None:
        for i in range(0, len(faces), batch):
            predict(faces[i : i + batch])
    over_all()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        over_all()
        best = min(best, time.process_time() - started)
    return 1000 * best / len(faces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("aligned")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    storage = load_settings().storage.resolved()
    ref = resolve_model(args.model, storage)
    folder, meta = artifact.read_meta(ref.uri, storage)
    chosen = cascade.Cascade.from_meta(meta)
    if chosen is None:
        raise SystemExit(f"{args.model} names no cascade")
    members = len(meta["members"])
    faces, _, _ = tune.load_faces(args.aligned, storage, int(meta.get("face_size", 48)), 1)
    x = {s: faces[s].x.astype(np.float32) for s in ("val", "test")}
    y = {s: faces[s].y for s in ("val", "test")}
    whole = lite.LiteModel(lite.export(ref.uri, storage, "float32"), meta, storage, threads=1)
    model = lite.CascadeModel.load(ref.uri, chosen, meta, storage)
    graphs = model.graphs
    print(f"{args.model}: {chosen.to_dict()}")
    flip = bool(meta["inference"].get("flip_tta"))
    for split in ("val", "test"):
        full = whole.predict(x[split])
        got, reached = cascade.run(chosen, len(y[split]), members,
                                   lambda k, p, rows: graphs[(k, p)].member_raw(x[split][rows], flip), meta["inference"])
        np.testing.assert_allclose(model.predict(x[split][:512]), got[:512], atol=1e-5)
        (acc, f1), (whole_acc, whole_f1) = accuracy_and_macro_f1(got, y[split]), accuracy_and_macro_f1(full, y[split])
        recall = [float((got.argmax(1)[y[split] == c] == c).mean()) for c in range(got.shape[1])]
        print(f"{split}: cascade {acc:.2%} (macro-F1 {f1:.2%}), whole {whole_acc:.2%} (macro-F1 {whole_f1:.2%}); "
              f"labels alike {(got.argmax(1) == full.argmax(1)).mean():.2%}; faces reaching each pass, then the whole "
              f"model: {', '.join(f'{r:.1%}' for r in reached)}; recall {', '.join(f'{r:.1%}' for r in recall)}")
    whole_ms = cpu_ms(whole.predict, x["test"], args.batch, args.repeats)
    cascade_ms = cpu_ms(model.predict, x["test"], args.batch, args.repeats)
    print(f"CPU ms a face on test (one thread, batches of {args.batch}): whole float32 {whole_ms:.2f}, "
          f"cascade {cascade_ms:.2f} ({whole_ms / cascade_ms:.2f}x)")


if __name__ == "__main__":
    main()
