"""`ferray annotate` against `fer` on an archive of ordinary photos: throughput, faces, accuracy, CPU split.

Usage:
  .venv/bin/python bench/annotate_photos.py [--images 1000] [--scale 10] [--configs hog:keras yunet:tflite:float32]
                                            [--equal-min-face 80] [--fer-site /tmp/fer-site] [--work DIR]
                                            [--no-scale] [--split-images 200]

The archive: N photo-like pictures, 300–640 px wide (a fifth 800–1280), JPEG and PNG, each holding one
FER-2013 PrivateTest face (labelled) upscaled bicubically to 110–230 px and blended with a feathered edge
into a background of coloured low-frequency texture, blurred shapes, a vignette and sensor noise.

For each ferray configuration (detector:runtime) and for `fer` (Haar + its CNN, 2 processes), on the same
N and scale×N archives: images/s end to end on a fresh 2-CPU local Ray (start-up included), faces found,
accuracy of the largest face over all labelled images, and ferray's peak memory N → scale×N. Then CPU per
image after a warm-up on one thread, split into decode, detect, align (landmarks + chip) and classify,
for each tool with its own minimum face, and an equal-terms line: the same minimum face width
(--equal-min-face) for both. `fer`: see bench/annotate.py for its install (`pip install --target`).
"""

from __future__ import annotations

import argparse
import io as pyio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

import annotate as bench  # bench/annotate.py, beside this script

log = logging.getLogger("bench.annotate_photos")
FORMATS = (("jpg", "JPEG"), ("png", "PNG"))


# --------------------------------------------------------------------------- the archive


def background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB background: coloured texture at a few scales, blurred shapes, a vignette."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 1.0), (9, 0.5), (27, 0.25)):
        coarse = rng.uniform(0, 255, (cells, max(2, cells * width // height), 3)).astype(np.float32)
        image += weight * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image /= 1.75
    for _ in range(int(rng.integers(2, 7))):  # furniture, windows, people's clothes: soft-edged blobs
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(width // 10, width // 2)), int(rng.integers(height // 10, height // 2)))
        if rng.random() < 0.5:
            cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            cv2.rectangle(image, (centre[0] - axes[0], centre[1] - axes[1]), (centre[0] + axes[0], centre[1] + axes[1]), colour, -1)
    image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(1.5, 6)))
    ys, xs = np.mgrid[0:height, 0:width]
    vignette = 1 - 0.35 * (((xs - width / 2) / width) ** 2 + ((ys - height / 2) / height) ** 2) * 2
    return image * vignette[..., None]


def photo(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One RGB photo holding the grey 48×48 face, upscaled to 110–230 px, tinted and feathered in."""
    side = int(rng.integers(110, 231))
    width = int(rng.integers(800, 1281)) if rng.random() < 0.2 else int(rng.integers(300, 641))
    width = max(width, side + 20)
    height = max(side + 20, int(width * rng.uniform(0.6, 1.34)))
    image = background(height, width, rng)
    big = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    tint = rng.uniform([0.9, 0.75, 0.6], [1.05, 0.9, 0.8])  # skin tones: red above green above blue
    skin = big[..., None] * tint
    mask = np.zeros((side, side), np.float32)
    cv2.ellipse(mask, (side // 2, side // 2), (int(side * 0.48), int(side * 0.52)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), side * 0.04)[..., None]
    y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    image[y : y + side, x : x + side] = mask * skin + (1 - mask) * image[y : y + side, x : x + side]
    image += rng.normal(0, rng.uniform(1, 5), image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def build_photos(target: Path, faces: list[tuple[str, np.ndarray]], count: int, seed: int,
                 each_once: bool = False) -> dict[str, str]:
    """A zip of `count` photos (JPEG quality 70–95, or PNG) of faces drawn at random, or of the first `count`
    faces in order (`each_once`); returns member → true label."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    truth = {}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            label, face = faces[index] if each_once else faces[pick.randrange(len(faces))]
            ext, fmt = FORMATS[index % len(FORMATS)]
            buffer = pyio.BytesIO()
            options = {"quality": int(rng.integers(70, 96))} if fmt == "JPEG" else {}
            Image.fromarray(photo(face, rng)).save(buffer, format=fmt, **options)
            name = f"photos/{index // 500:03d}/img-{index:06d}.{ext}"
            archive.writestr(name, buffer.getvalue())
            truth[name] = label
    return truth


# --------------------------------------------------------------------------- CPU per image, split


def ferray_split(settings: Any, model: str, archive: Path, truth: dict[str, str], limit: int) -> dict[str, float]:
    """ms per image on this one thread after a warm-up (decode, detect, align, classify), faces found and
    largest-face accuracy over the first `limit` images: FaceFinder's and Labeller's own parts, ungrouped."""
    from ferray.annotate.detect import FaceFinder
    from ferray.annotate.job import Job, face_settings, resolve_model, run_key, with_lite
    from ferray.annotate.label import Labeller
    from ferray.data import io as fio
    from ferray.data.images import decode
    from ferray.data.schema import LABELS
    from ferray.faces.align import align_face
    from ferray.faces.detect import detect_faces
    from ferray.faces.landmarks import predict_landmarks

    storage = settings.storage.resolved()
    ref = with_lite(resolve_model(model, storage), settings.annotate, storage)
    faces = face_settings(settings.faces, ref)
    job = Job(str(archive), "", storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    finder, labeller = FaceFinder(job), Labeller(job)
    tree = fio.Tree(str(archive), storage)
    members = sorted(truth)[:limit]
    first, cap = finder.first, settings.annotate.detect_max_side
    reach = finder.detector.reach(first.upsample)
    times = dict.fromkeys(("decode", "detect", "align", "classify"), 0.0)
    chips, owners = [], []
    for warm, names in ((True, members[:8]), (False, members)):
        chips, owners = [], []
        times = dict.fromkeys(times, 0.0)
        for name in names:
            t0 = time.process_time()
            image = decode(tree.read(name), faces.limits, faces.color)
            t1 = time.process_time()
            rects = [r for r in detect_faces(image, finder.detector, first.upsample, cap, reach, first.min_face_px)
                     if min(r.width(), r.height()) >= first.min_face_px]
            t2 = time.process_time()
            if rects:
                shape = predict_landmarks(image, rects[0], finder.predictor)
                chips.append(align_face(image, shape, faces.size, faces.padding, faces.chip_scale))
                owners.append(name)
            t3 = time.process_time()
            times["decode"] += t1 - t0
            times["detect"] += t2 - t1
            times["align"] += t3 - t2
        batch = np.stack(chips).reshape(len(chips), faces.size, faces.size, -1).astype(np.float32) if chips else None
        if batch is not None and not warm:
            # Untimed once: as in a long run, the graphs' buffers are already planned for a full batch (the
            # first batch of a new size costs LiteRT about 0.1 ms a face per float graph to plan).
            labeller.classify(batch)
        t4 = time.process_time()
        if batch is not None:
            probs = labeller.classify(batch)
        times["classify"] = time.process_time() - t4
        if warm:
            continue
    correct = sum(LABELS[int(p.argmax())] == truth[name] for name, p in zip(owners, probs)) if chips else 0
    result = {k: 1000 * v / len(members) for k, v in times.items()}
    result.update(found=len(owners) / len(members), accuracy=correct / len(members))
    return result


def fer_split_worker(archive: str, min_face: int, limit: int) -> None:
    """Inside a `fer` subprocess on one core: the same split (detect = its Haar cascade, classify = its CNN)."""
    bench._fer_init(min_face)
    fer = bench._FER
    with zipfile.ZipFile(archive) as source:
        items = [(name, source.read(name)) for name in sorted(source.namelist())[:limit]]
    times = dict.fromkeys(("decode", "detect", "classify"), 0.0)
    labels: dict[str, str | None] = {}
    for warm, chosen in ((True, items[:8]), (False, items)):
        times = dict.fromkeys(times, 0.0)
        for name, data in chosen:
            t0 = time.process_time()
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            t1 = time.process_time()
            boxes = fer.find_faces(image, bgr=True)
            t2 = time.process_time()
            found = fer.detect_emotions(image, face_rectangles=boxes) if len(boxes) else []
            t3 = time.process_time()
            times["decode"] += t1 - t0
            times["detect"] += t2 - t1
            times["classify"] += t3 - t2
            if not warm:
                largest = max(found, key=lambda f: f["box"][2] * f["box"][3]) if found else None
                labels[name] = max(largest["emotions"], key=largest["emotions"].get) if largest else None
    print(json.dumps({"ms": {k: 1000 * v / len(items) for k, v in times.items()}, "labels": labels}))


def fer_split(site: str, archive: Path, truth: dict[str, str], min_face: int, limit: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": site, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--fer-split", str(archive),
                           "--fer-min-face", str(min_face), "--split-images", str(limit)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    labels = result["labels"]
    out = dict(result["ms"])
    out.update(found=sum(v is not None for v in labels.values()) / len(labels),
               accuracy=sum(labels[m] == truth[m] for m in labels) / len(labels))
    return out


def _split_line(name: str, split: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {split[k]:.2f}" for k in ("decode", "detect", "align", "classify") if k in split)
    total = sum(split[k] for k in ("decode", "detect", "align", "classify") if k in split)
    return (f"{name}: {total:.2f} ms an image ({parts}) = {2000 / total:.0f} images/s on 2 CPUs; "
            f"found {split['found']:.1%}, largest-face accuracy {split['accuracy']:.1%}")


# --------------------------------------------------------------------------- main


def config_settings(config: str, min_face: int | None = None) -> Any:
    from ferray.config import load_settings

    detector, _, rest = config.partition(":")
    runtime, _, precision = rest.partition(":")
    faces: dict[str, Any] = {"detector": detector}
    if min_face is not None:
        faces["min_face_px"] = min_face
    annotate = {"runtime": runtime or "keras", **({"lite_precision": precision} if precision else {})}
    return load_settings(ray={"progress_bars": False}, faces=faces, annotate=annotate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="N")
    parser.add_argument("--scale", type=int, default=10, help="the large archive holds scale × N photos")
    parser.add_argument("--no-scale", action="store_true", help="only the N archive")
    parser.add_argument("--configs", nargs="+", default=["hog:keras", "yunet:tflite"],
                        help="detector:runtime[:lite_precision] (the model's own precision when not given)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--fer-site", default="/tmp/fer-site")
    parser.add_argument("--fer-processes", type=int, default=2)
    parser.add_argument("--equal-min-face", type=int, default=80, help="the minimum face width for both tools "
                        "in the equal-terms line (80: Dlib HOG's reach without upsampling)")
    parser.add_argument("--split-images", type=int, default=300, help="images timed on one thread for the split")
    parser.add_argument("--work", help="work folder (default: a temp folder); archives found there are reused")
    parser.add_argument("--build-only", action="store_true", help="build the archives in WORK and stop")
    parser.add_argument("--split-only", action="store_true", help="only the per-image CPU split, on WORK's N archive")
    parser.add_argument("--fer-split", help=argparse.SUPPRESS)
    parser.add_argument("--fer-min-face", type=int, default=bench.FER_MIN_FACE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fer_split:
        fer_split_worker(args.fer_split, args.fer_min_face, args.split_images)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    work = Path(args.work or tempfile.mkdtemp(prefix="ferray-bench-photos-"))
    work.mkdir(parents=True, exist_ok=True)
    site = bench.fer_available(args.fer_site)
    print(f"work {work}; configs {args.configs}; fer {'at ' + site if site else 'not found'}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the machine skews rates)")
    faces = bench.fer_faces("PrivateTest_")
    sizes = [1] if args.no_scale else [1, args.scale]
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    truths: dict[int, dict[str, str]] = {}
    for scale in sizes:
        archive = work / f"photos-{scale}.zip"
        started = time.perf_counter()
        count = args.images * scale
        # An archive of this size already in WORK is reused (build once, time later on a quiet machine).
        known = work / f"photos-{scale}.truth.json"
        if archive.exists() and known.exists() and len(json.loads(known.read_text())) == count:
            truths[scale] = json.loads(known.read_text())
            print(f"reusing {archive} ({count} photos)")
        else:
            truths[scale] = build_photos(archive, faces, count, seed=scale)
            known.write_text(json.dumps(truths[scale]))
            print(f"built {count} photos ({archive.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
        if args.build_only or args.split_only:
            continue
        for config in args.configs:
            result = bench.ferray_run(config_settings(config), Path(args.model), archive, work / f"out-{config.replace(':', '-')}-{scale}")
            found, accuracy = bench.ferray_accuracy(work / f"out-{config.replace(':', '-')}-{scale}", truths[scale], archive)
            runs[(config, scale)] = {**result, "found": found, "accuracy": accuracy, "rate": count / result["wall"]}
            print(f"ferray {config} ×{scale}: {count} photos, wall {result['wall']:.1f} s = {count / result['wall']:.1f} "
                  f"images/s, CPU {result['cpu']:.1f} s; found {found:.1%}, largest-face accuracy {accuracy:.1%}; "
                  f"peak Ray RSS {bench._mib(result['rss'])}, PSS {bench._mib(result['pss'])}")
        if site:
            fer = bench.fer_run(site, archive, truths[scale], args.fer_processes)
            runs[("fer", scale)] = fer
            print(f"fer ({args.fer_processes} processes) ×{scale}: wall {fer['wall']:.1f} s = {fer['rate']:.1f} images/s, "
                  f"CPU {fer['cpu']:.1f} s; found {fer['found']:.1%}, largest-face accuracy {fer['accuracy']:.1%}")
            for config in args.configs:
                mine = runs[(config, scale)]
                print(f"  ferray {config} / fer ×{scale}: images/s {mine['rate'] / fer['rate']:.2f}x, found "
                      f"{100 * (mine['found'] - fer['found']):+.1f} points, accuracy {100 * (mine['accuracy'] - fer['accuracy']):+.1f} points")
    if args.build_only:
        return
    if not args.no_scale and not args.split_only:
        for config in args.configs:
            small, large = runs[(config, 1)], runs[(config, args.scale)]
            print(f"peak memory ferray {config} N → {args.scale}N: RSS {bench._mib(small['rss'])} → {bench._mib(large['rss'])} "
                  f"({large['rss'] / small['rss'] - 1:+.1%}), PSS {bench._mib(small['pss'])} → {bench._mib(large['pss'])}")

    archive, truth = work / "photos-1.zip", truths[1]
    limit = min(args.split_images, len(truth))
    print(f"CPU per image on one thread after a warm-up ({limit} photos; ferray's parts ungrouped):")
    os.environ["OMP_NUM_THREADS"] = "1"  # YuNet's OpenMP, as in a 1-CPU actor
    from ferray.runtime import configure_tensorflow

    configure_tensorflow(1, use_gpu=False, inter_op=1)
    for config in args.configs:
        print("  " + _split_line(f"ferray {config}", ferray_split(config_settings(config), args.model, archive, truth, limit)))
    if site:
        print("  " + _split_line(f"fer min_face_size {bench.FER_MIN_FACE}", fer_split(site, archive, truth, bench.FER_MIN_FACE, limit)))
    equal = args.equal_min_face
    print(f"equal terms: both look for faces from {equal} px (ferray faces.min_face_px, fer min_face_size):")
    for config in args.configs:
        print("  " + _split_line(f"ferray {config}", ferray_split(config_settings(config, equal), args.model, archive, truth, limit)))
    if site:
        print("  " + _split_line("fer", fer_split(site, archive, truth, equal, limit)))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
