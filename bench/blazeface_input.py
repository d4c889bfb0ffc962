"""BlazeFace's input size: faces found and detection ms a picture for a few BLAZE_SEES values (the width,
in the model's input, that a face of the reach is scaled to), on the photo bench's archive.

Usage:
  .venv/bin/python bench/blazeface_input.py ARCHIVE.zip [--images 300] [--sees 24 28 32]

ARCHIVE.zip: an archive `bench/annotate_photos.py --build-only` writes (one face a photo). One thread,
each picture searched once to plan its input shape, then timed twice.
"""

from __future__ import annotations

import argparse
import logging
import time
import zipfile

import cv2
import numpy as np

from ferray.faces import blazeface
from ferray.faces.detect import detect_faces

log = logging.getLogger("bench.blazeface_input")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--sees", type=int, nargs="+", default=[24, 28, 32])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with zipfile.ZipFile(args.archive) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".png")))[:args.images]
        images = [cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_GRAYSCALE) for n in names]
    for sees in args.sees:
        blazeface.BLAZE_SEES = sees
        detector = blazeface.Blazeface(blazeface.model_path())
        for image in images:
            detector(image, 0)
        for _ in range(2):
            start, found = time.process_time(), 0
            for image in images:
                found += bool(detect_faces(image, detector, 0, 1920, detector.reach(0), 0))
            log.info("BLAZE_SEES %d: %.2f ms a picture, found %.1f%% of %d", sees,
                     1000 * (time.process_time() - start) / len(images), 100 * found / len(images), len(images))


if __name__ == "__main__":
    main()
