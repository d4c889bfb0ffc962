"""What an annotate actor spends before its first image: CPU seconds of each part's set-up and first batch.

Usage:
  .venv/bin/python bench/startup.py [--model default]

Each figure is measured in a fresh Python process (as a new Ray actor is): the classify actor's imports,
model load and first 8-face batch for `annotate.runtime` keras and tflite (the LiteRT graph already
cached), and the detect actor's set-up for each detector. CPU seconds, so other load hardly changes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
cpu = time.process_time
t0 = cpu()
import numpy as np
from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
from ferray.config import load_settings
part, model, knob, value = sys.argv[1:5]
section = "annotate" if knob == "runtime" else "faces"
settings = load_settings(**{section: {knob: value}})
storage = settings.storage.resolved()
ref = with_lite(resolve_model(model, storage), settings.annotate, storage)
faces = face_settings(settings.faces, ref)
job = Job("/tmp", "", storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
t1 = cpu()
if part == "label":
    from ferray.annotate.label import Labeller
    labeller = Labeller(job)
    t2 = cpu()
    labeller.classify(np.zeros((8, 48, 48, 1), np.float32))
else:
    from ferray.annotate.detect import FaceFinder
    finder = FaceFinder(job)
    t2 = cpu()
    finder.detector(np.zeros((480, 640), np.uint8), 0)
t3 = cpu()
print(json.dumps({"plan": t1 - t0, "setup": t2 - t1, "first": t3 - t2, "tensorflow": "tensorflow" in sys.modules}))
"""


def measure(part: str, model: str, knob: str, value: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, part, model, knob, value], capture_output=True, text=True,
                          check=True, env=None)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    for part, knob, values in (("label", "runtime", ("keras", "tflite")), ("detect", "detector", ("hog", "yunet"))):
        for value in values:
            r = measure(part, args.model, knob, value)
            print(f"{part} actor, {knob} {value}: imports+settings {r['plan']:.2f} CPU-s, set-up {r['setup']:.2f}, "
                  f"first batch {r['first']:.2f}; total {r['plan'] + r['setup'] + r['first']:.2f} CPU-s"
                  f"{' (TensorFlow imported)' if r['tensorflow'] else ''}")


if __name__ == "__main__":
    main()
