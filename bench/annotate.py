"""Annotation throughput and memory: `ferray annotate` on 2 CPUs, archives of N and 10×N files, vs `fer`.

Usage:
  .venv/bin/python bench/annotate.py [--images 200] [--videos 20] [--video-seconds 8] [--scale 10]
                                     [--upsample 1] [--model DIR] [--fer-site DIR] [--no-scale]
                                     [--flip-tta model|on|off] [--min-face PX] [--cpu-only --work DIR]

Builds zip archives from real FER-2013 PrivateTest faces (labelled): each face pasted 3–4× larger into
a varied canvas saved as jpg/png/webp/bmp/tiff, and videos written with OpenCV (320×240, 15 fps, a
sequence of faces for 80% of the time, then none). Runs `ferray.annotate.command.run` end to end on a fresh
local Ray with 2 CPUs for an image archive and a video archive of N and of 10×N files, and prints
images/s, video-seconds/s and peak memory (RSS and PSS summed over the raylet and its workers,
sampled every 0.2 s). Then runs the `fer` package (Haar cascade + its CNN, in 2 processes) on the same
N images, and prints both tools' images/s and accuracy of the largest face on the labelled images.

`fer` is installed outside the project's virtualenv, with only what it imports (OpenCV 5 moved the Haar
cascade to the contrib build):
  .venv/bin/pip install --no-deps --target /tmp/fer-site fer opencv-contrib-python-headless==5.0.0.93
MODEL is the shipped `default` unless --model names another artifact folder.
"""

from __future__ import annotations

import argparse
import io as pyio
import json
import logging
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ferray import annotate
from ferray.annotate.detect import FaceFinder
from ferray.annotate.job import Job, face_settings, resolve_model, run_key
from ferray.annotate.label import Labeller
from ferray.annotate.plan import plan_units
from ferray.data import io as fio
from ferray.config import Settings, load_settings
from ferray.faces import HOG_REACH

import proctree  # bench/proctree.py, beside this script

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fer2013.zip"
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF"))
FER_MIN_FACE = 50  # fer's default min_face_size
log = logging.getLogger("bench.annotate")


# --------------------------------------------------------------------------- real media


def fer_faces(split_prefix: str) -> list[tuple[str, np.ndarray]]:
    """(label, 48×48 grey face) of every FER-2013 image whose file name starts with the prefix."""
    out = []
    with zipfile.ZipFile(FER2013) as archive:
        for name in sorted(archive.namelist()):
            if name.rsplit("/", 1)[-1].startswith(split_prefix):
                face = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
                out.append((name.split("/")[-2], face))
    return out


def face_canvas(face: np.ndarray, rng: random.Random) -> np.ndarray:
    """The face 3–4× larger on a flat, gradient or blurred-noise canvas up to 420 px."""
    scale = rng.choice([3.0, 3.5, 4.0])
    big = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    h, w = big.shape
    height, width = rng.randint(h + 24, 420), rng.randint(w + 24, 420)
    kind = rng.choice(["flat", "gradient", "noise"])
    if kind == "flat":
        image = np.full((height, width), rng.randint(0, 255), np.uint8)
    elif kind == "gradient":
        image = np.tile(np.linspace(rng.randint(0, 127), rng.randint(128, 255), width), (height, 1)).astype(np.uint8)
    else:
        noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (height, width), dtype=np.uint8)
        image = cv2.GaussianBlur(noise, (0, 0), 3)
    y, x = rng.randint(0, height - h), rng.randint(0, width - w)
    image[y : y + h, x : x + w] = big
    return image


def video_bytes(faces: list[np.ndarray], seconds: float, fps: float, rng: random.Random, fourcc: str, ext: str) -> bytes:
    """A 320×240 video: a new face every 2 s, drifting a few pixels, for 80% of the time; then empty."""
    path = Path(tempfile.mkstemp(suffix=f".{ext}")[1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (320, 240))
    level = rng.randint(20, 120)
    background = np.tile(np.linspace(level, level + 100, 320), (240, 1)).astype(np.uint8)
    frames = int(seconds * fps)
    for k in range(frames):
        frame = background.copy()
        if k < 0.8 * frames:
            face = cv2.resize(faces[int(k / (2 * fps)) % len(faces)], None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
            x, y = 80 + (k % 10), 40 + (k % 7)
            frame[y : y + 144, x : x + 144] = face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    data = path.read_bytes()
    path.unlink()
    return data


def build_images(target: Path, faces: list[tuple[str, np.ndarray]], count: int, seed: int) -> dict[str, str]:
    """A zip of `count` canvases; returns member → true label."""
    rng = random.Random(seed)
    truth = {}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            label, face = faces[rng.randrange(len(faces))]
            ext, fmt = FORMATS[index % len(FORMATS)]
            buffer = pyio.BytesIO()
            Image.fromarray(face_canvas(face, rng)).convert("RGB").save(buffer, format=fmt)
            name = f"photos/{index // 500:03d}/img-{index:06d}.{ext}"
            archive.writestr(name, buffer.getvalue())
            truth[name] = label
    return truth


def build_videos(target: Path, faces: list[tuple[str, np.ndarray]], count: int, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            chosen = [faces[rng.randrange(len(faces))][1] for _ in range(int(seconds // 2) + 1)]
            fourcc, ext = ("mp4v", "mp4") if index % 2 == 0 else ("MJPG", "avi")
            archive.writestr(f"clips/clip-{index:05d}.{ext}", video_bytes(chosen, seconds, 15.0, rng, fourcc, ext))


# --------------------------------------------------------------------------- memory of the Ray processes


class RaySampler(threading.Thread):
    """Peak of the summed RSS and PSS of this driver's descendants: the local Ray it started (raylet,
    GCS, agents, workers and actors), or the `fer` subprocess and its pool; other Rays on the machine
    are not counted. Also the CPU seconds they and this driver used while it ran (start-up included,
    its own sampling excluded): a cost that other load on the machine hardly changes, unlike wall time."""

    # RSS and CPU every `period` s (counters: cheap); PSS every `pss_every` sweeps, since reading it walks every
    # mapping of every process: at 0.2 s for both it took ~18% of one of the 2 CPUs it shares with the run.
    def __init__(self, period: float = 0.5, pss_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.period, self.pss_every, self.sweeps, self.stop_event = period, pss_every, 0, threading.Event()
        self.peak_rss = self.peak_pss = 0
        # A process already running now counts from its CPU time now; one started later from 0.
        self.first: dict[int, float] = {pid: proctree.cpu_seconds(pid) for pid in proctree.descendants()}
        self.last: dict[int, float] = dict(self.first)
        self.started = time.process_time()
        self.own = 0.0
        self.failure: str | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            begun = time.thread_time()
            try:
                self.sweep()
            except Exception as error:  # a figure left incomplete is reported, never silently low
                self.failure = f"{type(error).__name__}: {error}"
            self.own += time.thread_time() - begun
            self.stop_event.wait(self.period)

    def sweep(self) -> None:
        pids = proctree.descendants()
        for pid in pids:
            self.first.setdefault(pid, 0.0)
            self.last[pid] = proctree.cpu_seconds(pid)
        self.peak_rss = max(self.peak_rss, sum(proctree.rss(pid) for pid in pids))
        if self.sweeps % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(proctree.memory(pid)[1] for pid in pids))
        self.sweeps += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.cpu = sum(self.last[p] - self.first[p] for p in self.last) + time.process_time() - self.started - self.own
        if self.failure:
            log.warning("process sampling failed at least once (%s): CPU and memory figures may be low", self.failure)


# --------------------------------------------------------------------------- runs


def ferray_run(settings: Settings, model: Path, source: Path, out: Path) -> dict[str, Any]:
    """One annotate run on a fresh 2-CPU local Ray into an empty OUT, with its wall time and peak worker memory."""
    import ray

    shutil.rmtree(out, ignore_errors=True)  # a --work reused by an earlier bench would make this a no-op rerun

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    sampler = RaySampler()
    sampler.start()
    started = time.perf_counter()
    summary = annotate.run(settings, str(model), str(source), str(out))
    wall = time.perf_counter() - started
    sampler.stop()
    ray.shutdown()
    return {"summary": summary, "wall": wall, "rss": sampler.peak_rss, "pss": sampler.peak_pss, "cpu": sampler.cpu}


def ferray_accuracy(out: Path, truth: dict[str, str], source: Path) -> tuple[float, float]:
    """(share of images with a face, accuracy of the largest face's label over all labelled images)."""
    storage = load_settings().storage
    rows = fio.read_table(fio.completed_shards(str(out), storage), storage, ["source_path", "face_index", "label_name"])
    predicted = {p[len(str(source)) + 1 :]: n for p, i, n in zip(*(rows[c].to_pylist() for c in rows.schema.names)) if i == 0}
    return len(predicted) / len(truth), sum(predicted.get(m) == label for m, label in truth.items()) / len(truth)


_FER: Any = None


def _fer_init(min_face: int = FER_MIN_FACE) -> None:
    global _FER
    from fer.fer import FER

    package = Path(sys.modules["fer"].__file__ or "").parent
    # OpenCV 5 wheels ship no cascade files; fer ships its own copy.
    _FER = FER(cascade_file=str(package / "data" / "haarcascade_frontalface_default.xml"), min_face_size=min_face)
    logging.getLogger("fer").setLevel(logging.WARNING)


def _fer_one(item: tuple[str, bytes]) -> tuple[str, str | None]:
    image = cv2.imdecode(np.frombuffer(item[1], np.uint8), cv2.IMREAD_COLOR)
    found = _FER.detect_emotions(image)
    if not found:
        return item[0], None
    largest = max(found, key=lambda f: f["box"][2] * f["box"][3])
    return item[0], max(largest["emotions"], key=largest["emotions"].get)


def fer_worker(archive: str, processes: int, min_face: int) -> None:
    """Inside the `fer` subprocess: label every image of the archive, print JSON on the last line.

    processes = 0: one process, timed in CPU seconds after a warm-up (insensitive to other load)."""
    if processes == 0:
        _fer_init(min_face)
        with zipfile.ZipFile(archive) as source:
            items = [(name, source.read(name)) for name in source.namelist()]
        for item in items[:8]:
            _fer_one(item)
        started = time.process_time()
        for item in items:
            _fer_one(item)
        print(json.dumps({"cpu_ms": 1000 * (time.process_time() - started) / len(items)}))
        return
    started = time.perf_counter()
    with zipfile.ZipFile(archive) as source, multiprocessing.get_context("spawn").Pool(processes, _fer_init, (min_face,)) as pool:
        items = [(name, source.read(name)) for name in source.namelist()]
        results = dict(pool.map(_fer_one, items, chunksize=8))
    print(json.dumps({"wall": time.perf_counter() - started, "labels": results}))


def fer_run(site: str, archive: Path, truth: dict[str, str], processes: int, min_face: int = FER_MIN_FACE) -> dict[str, float]:
    """The `fer` package (Haar + its CNN) over the same images, in `processes` processes.

    It runs in a subprocess whose PYTHONPATH puts fer's contrib OpenCV ahead of the project's
    headless one (spawned pool workers inherit that path).
    """
    env = {**os.environ, "PYTHONPATH": site, "TF_CPP_MIN_LOG_LEVEL": "2"}
    sampler = RaySampler()
    sampler.start()
    done = subprocess.run([sys.executable, __file__, "--fer-worker", str(archive), "--fer-processes", str(processes),
                           "--fer-min-face", str(min_face)],
                          env=env, capture_output=True, text=True, check=True)
    sampler.stop()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    labels = result["labels"]
    found = sum(labels.get(m) is not None for m in truth)
    correct = sum(labels.get(m) == label for m, label in truth.items())
    wall = result["wall"]
    return {"wall": wall, "rate": len(truth) / wall, "found": found / len(truth), "accuracy": correct / len(truth),
            "cpu": sampler.cpu}


def fer_cpu(site: str, archive: Path, min_face: int = FER_MIN_FACE) -> float:
    """CPU milliseconds per image of `fer` in one process (TFLite limited to one thread by taskset)."""
    env = {**os.environ, "PYTHONPATH": site, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--fer-worker", str(archive),
                           "--fer-processes", "0", "--fer-min-face", str(min_face)],
                          env=env, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["cpu_ms"])


def ferray_cpu(settings: Settings, model: Path, archive: Path) -> tuple[float, float]:
    """CPU milliseconds per image of one ferray actor's work (decode + detect + align; classify),
    in this process after a warm-up, with TensorFlow on one thread as in an actor."""
    from ferray.executor.ledger import Ledger

    storage = settings.storage.resolved()
    ref = resolve_model(str(model), storage)
    faces = face_settings(settings.faces, ref)
    job = Job(str(archive), "", storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    tree = fio.Tree(str(archive), storage)
    units = plan_units(tree, tree.files(), Ledger([], job.run_key), settings.annotate)
    finder, labeller = FaceFinder(job), Labeller(job)
    labeller(finder.find(units[:8])[0])  # traces the model once, as an actor does on its first shard
    started = time.process_time()
    drafts, _ = finder.find(units)
    found = time.process_time()
    labeller(drafts)
    done = time.process_time()
    return 1000 * (found - started) / len(units), 1000 * (done - found) / len(units)


def cpu_comparison(settings: Settings, model: Path, site: str | None, archive: Path, fer_min_face: int) -> None:
    """Per-image CPU time of both tools on one core: a rate that other load on the machine cannot skew."""
    detect_ms, label_ms = ferray_cpu(settings, model, archive)
    line = (f"CPU per image, one core, after warm-up: ferray {detect_ms + label_ms:.1f} ms (decode+detect+align "
            f"{detect_ms:.1f}, classify {label_ms:.1f}) = {2000 / (detect_ms + label_ms):.0f} images/s on 2 CPUs")
    if site is not None:
        fer_ms = fer_cpu(site, archive, fer_min_face)
        line += f"; fer {fer_ms:.1f} ms = {2000 / fer_ms:.0f} images/s on 2 CPUs; ferray / fer {fer_ms / (detect_ms + label_ms):.2f}x"
    print(line)
    if site is not None and fer_min_face < HOG_REACH:
        # fer's Haar cascade looks for faces from 50 px, Dlib's HOG (upsample 0) from about 80: the same
        # floor for both shows what the detectors cost on equal terms.
        matched = fer_cpu(site, archive, HOG_REACH)
        print(f"fer with min_face_size {HOG_REACH} (the smallest face Dlib's HOG finds without upsampling): "
              f"{matched:.1f} ms per image; ferray / fer {matched / (detect_ms + label_ms):.2f}x")


def fer_available(site: str | None) -> str | None:
    """Where `fer` and a Haar-capable OpenCV can be imported from, or None."""
    if not site or not (Path(site) / "fer" / "fer.py").is_file():
        return None
    check = "import cv2, fer.fer; cv2.CascadeClassifier"
    found = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": site, "TF_CPP_MIN_LOG_LEVEL": "2"},
                           capture_output=True)
    return site if found.returncode == 0 else None


# --------------------------------------------------------------------------- main


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="N for the image archive")
    parser.add_argument("--videos", type=int, default=20, help="N for the video archive")
    parser.add_argument("--video-seconds", type=float, default=8.0)
    parser.add_argument("--scale", type=int, default=10, help="the large archives hold scale × N files")
    parser.add_argument("--upsample", type=int, default=None, help="faces.upsample for the run (default: config)")
    parser.add_argument("--model", default="default", help="model folder (default: the shipped `default` model)")
    parser.add_argument("--fer-site", default="/tmp/fer-site", help="folder holding `fer` (pip --target)")
    parser.add_argument("--no-scale", action="store_true", help="only the N archives")
    parser.add_argument("--work", help="work folder (default: a temp folder)")
    parser.add_argument("--fer-worker", help=argparse.SUPPRESS)
    parser.add_argument("--fer-processes", type=int, default=2, help="processes for fer (default 2, one per CPU)")
    parser.add_argument("--fer-min-face", type=int, default=FER_MIN_FACE, help=argparse.SUPPRESS)
    parser.add_argument("--min-face", type=int, help="faces.min_face_px for ferray and min_face_size for fer "
                        "(default: each tool's own, 0 = Dlib HOG's 80 px reach and 50)")
    parser.add_argument("--flip-tta", choices=["model", "on", "off"], default="model",
                        help="annotate.flip_tta: as the model says (default), or forced on/off")
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU-time comparison on an existing --work")
    args = parser.parse_args()
    if args.fer_worker:
        fer_worker(args.fer_worker, args.fer_processes, args.fer_min_face)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.stdout.reconfigure(line_buffering=True)
    overrides: dict[str, Any] = {"ray": {"progress_bars": False}}
    overrides["faces"] = {} if args.upsample is None else {"upsample": args.upsample}
    fer_min_face = FER_MIN_FACE
    if args.min_face is not None:  # both tools look for faces from the same width
        overrides["faces"]["min_face_px"] = fer_min_face = args.min_face
    if args.flip_tta != "model":
        overrides["annotate"] = {"flip_tta": args.flip_tta == "on"}
    settings = load_settings(**overrides)
    work = Path(args.work or tempfile.mkdtemp(prefix="ferray-bench-annotate-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    test_faces = fer_faces("PrivateTest_")
    print(f"model {model}; faces.upsample {settings.faces.upsample}; annotate.flip_tta {settings.annotate.flip_tta}; faces.min_face_px {settings.faces.min_face_px}, fer min_face_size {fer_min_face}; work {work}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the machine skews rates)")

    if args.cpu_only:
        if not (work / "images-1.zip").is_file():
            build_images(work / "images-1.zip", test_faces, args.images, seed=1)
        cpu_comparison(settings, model, fer_available(args.fer_site), work / "images-1.zip", fer_min_face)
        return
    sizes = [1] if args.no_scale else [1, args.scale]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    truths: dict[int, dict[str, str]] = {}
    for scale in sizes:
        images, videos = work / f"images-{scale}.zip", work / f"videos-{scale}.zip"
        started = time.perf_counter()
        truth = truths[scale] = build_images(images, test_faces, args.images * scale, seed=scale)
        build_videos(videos, test_faces, args.videos * scale, args.video_seconds, seed=scale)
        print(f"built {args.images * scale} images ({images.stat().st_size / 2**20:.0f} MiB) and {args.videos * scale} "
              f"videos ({videos.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
        for kind, source in (("images", images), ("videos", videos)):
            result = ferray_run(settings, model, source, work / f"out-{kind}-{scale}")
            summary = result["summary"]
            results[(kind, scale)] = result
            amount = args.images * scale if kind == "images" else summary.extra["video_seconds"]
            unit = "images/s" if kind == "images" else "video-s/s"
            print(f"ferray {kind} ×{scale}: {summary.rows} rows, {summary.shards_written} shards, wall {result['wall']:.1f} s "
                  f"= {amount / result['wall']:.1f} {unit}, CPU {result['cpu']:.1f} s; faces {summary.extra['faces']}, "
                  f"no-face rate {summary.extra['no_face_rate']:.3f}; peak Ray RSS {_mib(result['rss'])}, PSS {_mib(result['pss'])}")
        found, accuracy = ferray_accuracy(work / f"out-images-{scale}", truth, images)
        print(f"ferray ×{scale} on the labelled images: face found {found:.1%}, largest-face accuracy {accuracy:.1%}")
    for kind in ("images", "videos"):
        if (kind, args.scale) in results:
            small, large = results[(kind, 1)], results[(kind, args.scale)]
            print(f"peak memory {kind} N → {args.scale}N: RSS {_mib(small['rss'])} → {_mib(large['rss'])} "
                  f"({large['rss'] / small['rss'] - 1:+.1%}), PSS {_mib(small['pss'])} → {_mib(large['pss'])} "
                  f"({large['pss'] / small['pss'] - 1:+.1%})")

    site = fer_available(args.fer_site)
    if site is None:
        print(f"fer: not found under {args.fer_site}; install it with "
              "`pip install --no-deps --target DIR fer opencv-contrib-python-headless==5.0.0.93`")
        return
    cpu_comparison(settings, model, site, work / "images-1.zip", fer_min_face)
    for scale in sizes:
        count = args.images * scale
        fer = fer_run(site, work / f"images-{scale}.zip", truths[scale], args.fer_processes, fer_min_face)
        rate = count / results[("images", scale)]["wall"]
        print(f"fer (Haar + its CNN, {args.fer_processes} processes) ×{scale}: {count} images, wall {fer['wall']:.1f} s = "
              f"{fer['rate']:.1f} images/s, CPU {fer['cpu']:.1f} s; face found {fer['found']:.1%}, "
              f"largest-face accuracy {fer['accuracy']:.1%}")
        print(f"ferray / fer images/s ×{scale}: {rate / fer['rate']:.2f}x (ferray {rate:.1f}; both walls include "
              f"starting their workers)")
        ferray_cpu_s = results[("images", scale)]["cpu"]
        print(f"ferray / fer images per CPU-second ×{scale}, every process and start-up included: "
              f"{fer['cpu'] / ferray_cpu_s:.2f}x (ferray {count / ferray_cpu_s:.1f}, fer {count / fer['cpu']:.1f}; "
              "= the images/s ratio on an otherwise idle machine when both keep their CPUs busy)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
