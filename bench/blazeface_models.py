"""MediaPipe's BlazeFace models side by side on the photo bench's archive: detection ms a picture, faces
found, and where each model's box lies against Dlib's HOG box on the faces both find (the width ratio and
centre offset `ferray.faces.blazeface.Variant` maps its boxes with).

Usage:
  .venv/bin/python bench/blazeface_models.py ARCHIVE.zip [--images 300] [--variants back full_range]
                                             [--sees 24] [--min-scores 0.5 0.4] [--layouts tiles canvas]

ARCHIVE.zip: an archive `bench/annotate_photos.py --build-only` writes (one face a photo). One thread,
each picture searched once as a warm-up, then timed twice; `--sees` and `--min-scores` override the
variants' own; `--layouts` runs each picture in tiles of the model's input or as one canvas input of its
own shape (default: the variant's own way). Pictures are read grey, as annotate's grey model has them decoded; "more than one" counts
the pictures given more faces than the one they hold.
"""

from __future__ import annotations

import argparse
import logging
import time
import zipfile

import cv2
import numpy as np

from ferray import faces
from ferray.config import FacesSettings
from ferray.faces import blazeface
from ferray.faces.detect import Box, detect_faces

log = logging.getLogger("bench.blazeface_models")


def centre(box: Box) -> tuple[float, float]:
    return (box.left + box.right) / 2, (box.top + box.bottom) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(blazeface.VARIANTS), choices=list(blazeface.VARIANTS))
    parser.add_argument("--sees", type=int, nargs="*", default=[])
    parser.add_argument("--min-scores", type=float, nargs="*", default=[])
    parser.add_argument("--layouts", nargs="*", default=[], choices=["tiles", "canvas"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with zipfile.ZipFile(args.archive) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".png")))[:args.images]
        images = [cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_GRAYSCALE) for n in names]
    hog = faces.load_detector(FacesSettings(detector="hog"))
    by_hog = [detect_faces(image, hog, 0) for image in images]
    log.info("hog: found %.1f%% of %d", 100 * sum(map(bool, by_hog)) / len(images), len(images))
    for name in args.variants:
        own = blazeface.VARIANTS[name]
        layouts = [layout == "canvas" for layout in args.layouts] or [own.canvas]
        for sees, least, canvas in [(s, m, c) for s in args.sees or [own.sees] for m in args.min_scores or [own.min_score]
                                    for c in layouts]:
            # Raw boxes (no mapping) to measure the mapping; the timing does not depend on it.
            variant = own._replace(sees=sees, width_ratio=1.0, centre_down=0.0, min_score=least, canvas=canvas)
            detector = blazeface.Blazeface(blazeface.model_path(variant), variant)
            for image in images:
                detector(image, 0)
            for _ in range(2):
                start, found = time.process_time(), []
                for image in images:
                    found.append(detect_faces(image, detector, 0, 1920, detector.reach(0), 0))
                ms = 1000 * (time.process_time() - start) / len(images)
            ratios, downs = [], []
            for mine, theirs in zip(found, by_hog):
                if mine and theirs:
                    (mx, my), (hx, hy) = centre(mine[0]), centre(theirs[0])
                    if abs(mx - hx) < mine[0].width() / 2 and abs(my - hy) < mine[0].width() / 2:
                        ratios.append(theirs[0].width() / mine[0].width())
                        downs.append((hy - my) / mine[0].width())
            log.info("%s (%s) at sees %d, min score %.2f: %.2f ms a picture, found %.1f%% of %d, more than one %.1f%%; "
                     "against HOG on %d faces: width ratio %.3f, centre down %.3f", name, "canvas" if canvas else "tiles", sees, least, ms,
                     100 * sum(map(bool, found)) / len(images), len(images),
                     100 * sum(len(f) > 1 for f in found) / len(images), len(ratios), float(np.median(ratios)) if ratios else float("nan"),
                     float(np.median(downs)) if downs else float("nan"))


if __name__ == "__main__":
    main()
