"""Alignment throughput: the Ray stage on all CPUs versus a plain single-process loop, same images.

Usage: .venv/bin/python bench/align.py [--source ../shared/datasets/fer2013.zip] [--canvases 500]
Ingests SOURCE (FER-2013), times a single-process loop of the same per-row functions over every
image, then `ferray align` (Ray Data, one actor per CPU) over the same shards, and prints both rates,
their ratio, the Ray stage's wall time and the detection share. Then builds larger canvases from
random FER-2013 faces and reports the detection share on them.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

from ferray import faces
from ferray.data import ingest
from ferray.faces import stage as align
from ferray.data import io as fio
from ferray.config import load_settings
from ferray.data.images import DecodeError, open_checked, to_array

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fer2013.zip"


def single_loop(images: list[bytes], settings) -> tuple[float, int]:
    """The stage's per-row work without Ray: decode, detect, landmark, align, encode."""
    detector, predictor = faces.load_detector(settings.faces), faces.load_predictor(settings.faces)
    detected = 0
    started = time.perf_counter()
    for data in images:
        try:
            image = to_array(open_checked(data, settings.faces.limits), settings.faces.color)
        except DecodeError:
            continue
        result = faces.align_image(image, detector, predictor, settings.faces, max_faces=1)
        if result.faces:
            faces.encode_png(result.faces[0].chip)
            detected += result.faces[0].source == "detected"
    return time.perf_counter() - started, detected


def canvas_detection(zip_path: str, count: int, settings) -> float:
    """Share of random FER-2013 faces found once pasted, 3–4× larger, into bigger canvases."""
    rng = random.Random(0)
    with zipfile.ZipFile(zip_path) as archive:
        names = rng.sample([n for n in archive.namelist() if n.startswith("train/")], count)
        raw = [archive.read(n) for n in names]
    detector = faces.load_detector(settings.faces)
    found = 0
    for data in raw:
        face = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        scale = rng.choice([3.0, 3.5, 4.0])
        big = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        h, w = big.shape
        image = np.full((rng.randint(h + 24, 420), rng.randint(w + 24, 420)), rng.randint(0, 255), np.uint8)
        y, x = rng.randint(0, image.shape[0] - h), rng.randint(0, image.shape[1] - w)
        image[y : y + h, x : x + w] = big
        found += bool(faces.detect_faces(image, detector, settings.faces.upsample))
    return found / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT))
    parser.add_argument("--canvases", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(ray={"progress_bars": False})
    work = Path(tempfile.mkdtemp(prefix="ferray-bench-align-"))
    ingested, aligned = str(work / "in"), str(work / "aligned")
    ingest.run(settings, "fer2013", args.source, ingested)
    images = fio.read_table(fio.completed_shards(ingested, settings.storage), settings.storage, ["image"])["image"].to_pylist()

    loop_s, loop_detected = single_loop(images, settings)
    loop_rate = len(images) / loop_s
    print(f"single-process loop: {len(images)} images in {loop_s:.1f} s = {loop_rate:.0f} img/s "
          f"(detected {loop_detected / len(images):.1%})")

    started = time.perf_counter()
    summary = align.run(settings, ingested, aligned)
    ray_s = time.perf_counter() - started
    ray_rate = summary.rows / ray_s
    detected = summary.extra.get("detected", 0)
    print(f"ray stage (ferray align, {int(__import__('ray').cluster_resources()['CPU'])} CPUs): {summary.rows} images in "
          f"{ray_s:.1f} s wall = {ray_rate:.0f} img/s; ok {summary.by_status.get('ok', 0)}, "
          f"detected {detected} ({detected / summary.rows:.1%}), full_frame {summary.extra.get('full_frame', 0)}")
    print(f"speed-up ray / loop: {ray_rate / loop_rate:.2f}x")
    share = canvas_detection(args.source, args.canvases, settings)
    print(f"detection on {args.canvases} random FER-2013 train faces pasted 3-4x larger into canvases: {share:.1%}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
