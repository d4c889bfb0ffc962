"""The LiteRT graphs of a model against the model itself on aligned test faces (FER-2013 PrivateTest).

Usage:
  .venv/bin/python bench/lite_accuracy.py [--model default] [--data ~/ferray-runs/data/fer2013-aligned]
                                          [--precision float32 float16 int8] [--split test]

For each precision: export the graph (int8 calibrated on the data's first 500 `train` faces; cached by the
model's sha256, so a rerun converts nothing), then accuracy with the artifact's flip TTA and temperature
(ferray.model.artifact.apply_inference, as annotate applies them), agreement of the labels with Keras, the
largest probability difference, and CPU ms per face on one thread (batches of 256, after a warm-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from ferray.annotate.job import resolve_model
from ferray.config import load_settings
from ferray.evaluate import scoring
from ferray.model import artifact, lite
from ferray.model.embed import decode_faces

log = logging.getLogger("bench.lite_accuracy")


def cpu_ms(predict, faces: np.ndarray) -> float:
    predict(faces[:256])
    started = time.process_time()
    predict(faces[:1024])
    return 1000 * (time.process_time() - started) / len(faces[:1024])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=os.path.expanduser("~/ferray-runs/data/fer2013-aligned"))
    parser.add_argument("--precision", nargs="+", default=["float32", "float16", "int8"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--calibration-faces", type=int, help="train faces calibrating int8 (default: ensemble.calibration_faces)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ferray.runtime import configure_tensorflow

    configure_tensorflow(1, use_gpu=False, inter_op=1)  # one thread, as in an actor
    settings = load_settings()
    storage = settings.storage.resolved()
    ref = resolve_model(args.model, storage)
    rows = scoring.select(args.data, storage, None, args.split, reuse_embeddings=False)
    faces = decode_faces(rows.faces, ref.face_size, 1 if ref.face_color == "gray" else 3)  # type: ignore[arg-type]
    labels = rows.labels
    keras_model = artifact.load(ref.uri, storage)
    reference = keras_model.predict(faces)
    keras_accuracy = float((reference.argmax(1) == labels).mean())
    print(f"{len(labels)} {args.split} faces of {args.data}; model {ref.uri} ({ref.version}), flip TTA "
          f"{keras_model.meta.get('inference', {}).get('flip_tta')}, temperature {keras_model.meta.get('inference', {}).get('temperature')}")
    print(f"keras    accuracy {keras_accuracy:.2%}; {cpu_ms(keras_model.predict, faces):.2f} CPU ms a face (TTA included)")
    calibration = None
    for precision in args.precision:
        if precision in lite.NEEDS_CALIBRATION and calibration is None:
            calibration = lite.calibration_faces(args.data, storage, args.calibration_faces or settings.ensemble.calibration_faces)
        started = time.perf_counter()
        uri = lite.export(ref.uri, storage, precision, calibration if precision in lite.NEEDS_CALIBRATION else None)
        seconds = time.perf_counter() - started
        model = lite.LiteModel(uri, keras_model.meta, storage)
        probs = model.predict(faces)
        accuracy = float((probs.argmax(1) == labels).mean())
        agree = float((probs.argmax(1) == reference.argmax(1)).mean())
        print(f"{precision:8} accuracy {accuracy:.2%} ({100 * (accuracy - keras_accuracy):+.2f} points), agreement "
              f"{agree:.2%}, max |Δp| {np.abs(probs - reference).max():.4f}; {cpu_ms(model.predict, faces):.2f} CPU ms "
              f"a face; {os.path.getsize(uri) / 2**20:.1f} MiB; export/lookup {seconds:.0f} s ({uri})")


if __name__ == "__main__":
    main()
