"""What `faces.min_face_px` saves on HD frames: Dlib HOG time per 1920×1080 frame, one core.

Usage: .venv/bin/python bench/detect_scale.py [--frames 40] [--min-face 0 160 240]

Each frame is blurred noise with one FER-2013 PrivateTest face pasted 6× larger (288 px; HOG's box is about
180 px). Detection runs as `ferray annotate` runs it (faces.detect_faces with HOG's reach and the minimum
face width); the script prints CPU milliseconds per frame and how many faces were found.
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import cv2
import dlib
import numpy as np

from ferray.faces import HOG_REACH, detect_faces

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fer2013.zip"


def frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    with zipfile.ZipFile(FER2013) as archive:
        names = [n for n in sorted(archive.namelist()) if n.rsplit("/", 1)[-1].startswith("PrivateTest_")][:count]
        for name in names:
            face = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
            frame = cv2.GaussianBlur(rng.integers(0, 256, (1080, 1920), dtype=np.uint8), (0, 0), 3)
            frame[300:588, 800:1088] = cv2.resize(face, None, fx=6, fy=6, interpolation=cv2.INTER_CUBIC)
            out.append(frame)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--min-face", type=int, nargs="+", default=[0, 160, 240])
    args = parser.parse_args()
    detector = dlib.get_frontal_face_detector()
    cv2.setNumThreads(1)
    images = frames(args.frames)
    for min_face in args.min_face:
        started = time.process_time()
        found = sum(bool(detect_faces(image, detector, 0, 1920, HOG_REACH, min_face)) for image in images)
        per_frame = (time.process_time() - started) / len(images)
        print(f"1920x1080, faces.min_face_px {min_face}: {1000 * per_frame:.0f} ms a frame on one core, "
              f"a face found in {found} of {len(images)} frames")


if __name__ == "__main__":
    main()
