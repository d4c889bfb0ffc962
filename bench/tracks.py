"""Face tracks: their cost as a share of `ferray annotate`, and per-track accuracy with and without smoothing.

Usage:
  .venv/bin/python bench/tracks.py [--seconds 60] [--change 5] [--noise 12] [--jitter 3] [--model default]
                                   [--work DIR] [--png docs/tracking-timeline.png]

Writes two two-person videos (480×240, 10 fps, `--seconds` long): FER-2013 PrivateTest faces that HOG
finds, 3× enlarged, side by side; each person changes expression every `--change` s on average (random
classes); every frame jittered, slightly turned and scaled, with Gaussian noise. `persistent.mp4` shows
one face per expression (the model's errors persist through an expression, as for a person whose face
it reads wrong); `varied.mp4` shows several faces of the expression in turn, a new one every 0.1 s
(frame-level errors independent, the flicker smoothing is for). Runs `ferray.annotate.run` on both
(local Ray, 2 CPUs, 10 s segments, fps 2), then times the pass tracking adds (link + smooth +
summaries, the shard columns, the per-track parquet and the matplotlib timeline) again on the written
rows and prints it as a share of the annotate run; a synthetic hour of three faces gives the linker's
cost per face row. Accuracy: each face row's raw and smoothed label against the expression on screen
at its time, per person, for the run's window and others (offline, ferray.annotate.tracks.smooth). The
persistent video's timeline is copied to `--png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from ferray.annotate import tracks
from ferray.annotate.detect import FaceFinder
from ferray.annotate.job import Job, ModelRef, face_settings
from ferray.executor.ledger import marked_shards
from ferray import annotate
from ferray.data import io
from ferray.config import StorageSettings, load_settings
from ferray.data.schema import LABELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scenes import SCALE, Person, Scene, still  # noqa: E402  (tests/scenes.py: the tests' scene builder)

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fer2013.zip"
STORAGE = StorageSettings()
log = logging.getLogger("bench.tracks")


def detectable_faces(per_class: int, seed: int) -> dict[str, list[np.ndarray]]:
    """PrivateTest faces per class that HOG finds once pasted 3× (about 70% are), a seeded sample."""
    settings = load_settings()
    model = ModelRef("unused", "v", 48, "gray")
    faces = face_settings(settings.faces, model)
    finder = FaceFinder(Job("/tmp", "", STORAGE, faces, settings.annotate, model, "k"))
    by_class: dict[str, list[np.ndarray]] = {name: [] for name in LABELS}
    with zipfile.ZipFile(FER2013) as archive:
        names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1].startswith("PrivateTest")]
        random.Random(seed).shuffle(names)
        for name in names:
            label = name.split("/")[-2]
            if label not in by_class or len(by_class[label]) >= per_class:
                continue
            face = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
            frame = np.full((240, 240), 110, np.uint8)
            frame[48:192, 48:192] = cv2.resize(face, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
            if finder.aligned_rows(frame, {}, name)[0]["status"] == "ok":
                by_class[label].append(face)
            if all(len(v) >= per_class for v in by_class.values()):
                break
    return by_class


class Wobbly(Scene):
    """A scene whose faces turn and scale a little every frame (head motion), on top of jitter and noise."""

    def frames(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + 1)
        out = []
        for frame in super().frames():
            angle, scale = rng.normal(0, 4), 1 + rng.normal(0, 0.04)
            matrix = cv2.getRotationMatrix2D((frame.shape[1] / 2, frame.shape[0] / 2), angle, scale)
            out.append(cv2.warpAffine(frame, matrix, frame.shape[::-1], borderMode=cv2.BORDER_REPLICATE))
        return out


def two_people(faces: dict[str, list[np.ndarray]], seconds: float, change: float, noise: float, jitter: int,
               seed: int, varied: bool) -> Scene:
    """Two people side by side changing expression every ~`change` s. `varied`: each expression shown by
    several faces in turn (a new one every 0.1 s), so that the model's frame-level errors are
    independent; else one face per expression, so that its errors persist through the expression."""
    rng = random.Random(seed)
    people = []
    for name, x in (("left", 40), ("right", 296)):
        expressions: list[Any] = []
        t = 0.0
        while t < seconds:
            span = min(seconds - t, rng.uniform(0.5 * change, 1.5 * change))
            label = rng.choice([k for k in LABELS if faces[k]])
            expressions.append((t, t + span, label, list(faces[label]) if varied else rng.choice(faces[label])))
            t += span
        people.append(Person(name, expressions, still(x, 48)))
    return Wobbly(people, seconds, fps=10.0, jitter=jitter, noise=noise, seed=seed)


def face_rows(out: Path) -> pa.Table:
    rows = io.read_table(io.completed_shards(str(out), STORAGE), STORAGE)
    return rows.filter(pa.compute.equal(rows["media_type"], "video"))


def accuracy(scene: Scene, rows: list[dict[str, Any]], labels: np.ndarray) -> dict[str, float]:
    """Share of face rows whose label is the expression on screen, overall and per person."""
    hits: dict[str, list[bool]] = {}
    for row, label in zip(rows, labels):
        who = scene.who(row["timestamp_s"], row["bbox"])
        hits.setdefault(who, []).append(LABELS[int(label)] == scene.truth(who, row["timestamp_s"]))
    out = {who: float(np.mean(h)) for who, h in sorted(hits.items())}
    out["all"] = float(np.mean([x for h in hits.values() for x in h]))
    return out


def changes_per_minute(rows: list[dict[str, Any]], labels: np.ndarray | list[str], seconds: float) -> float:
    """Label changes between consecutive rows of the same track, per minute of video (flicker)."""
    last: dict[Any, Any] = {}
    changes = 0
    for row, label in zip(rows, labels):
        key = row["track_id"]
        changes += key in last and last[key] != label
        last[key] = label
    return changes / (seconds / 60)


def linker_cost(hours: float = 1.0) -> float:
    """µs per face row to link and smooth an hour of three drifting faces sampled at 2 fps."""
    rng = np.random.default_rng(0)
    frames = int(hours * 3600 * 2)
    index = np.repeat(np.arange(frames), 3)
    centres = np.array([[100.0, 100.0], [300.0, 100.0], [500.0, 120.0]])
    boxes = np.concatenate([np.c_[centres + rng.normal(0, 4, (3, 2)) - 50, np.full((3, 2), 100.0)] for _ in range(frames)])
    probs = rng.dirichlet(np.ones(7), len(index))
    started = time.perf_counter()
    ids = tracks.link(index, index * 0.5, boxes)
    tracks.smooth(ids, index * 0.5, probs, 2.0)
    assert len(set(ids.tolist())) == 3
    return (time.perf_counter() - started) / len(index) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--change", type=float, default=5.0, help="mean seconds between expression changes")
    parser.add_argument("--noise", type=float, default=12.0)
    parser.add_argument("--jitter", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "tracking-timeline.png")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = args.work or Path(tempfile.mkdtemp(prefix="ferray-bench-tracks-"))
    source, out = work / "source", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    faces = detectable_faces(6, args.seed)
    scenes = {f"{kind}.mp4": two_people(faces, args.seconds, args.change, args.noise, args.jitter, args.seed,
                                        kind == "varied") for kind in ("persistent", "varied")}
    for name, scene in scenes.items():
        scene.write(source / name)

    settings = load_settings(ray={"progress_bars": False, "num_cpus": 2}, annotate={"segment_seconds": 10.0})
    started = time.perf_counter()
    summary = annotate.run(settings, args.model, str(source), str(out))
    total = time.perf_counter() - started
    everything = face_rows(out)
    results: dict[str, Any] = {"annotate_s": round(total, 2), "sampled_frames": summary.extra.get("frames"),
                               "linker_us_per_face_row": round(linker_cost(), 1)}

    # The tracking pass again, on the rows annotate wrote (what it added to the run), video by video.
    passes = []
    for name in scenes:
        mine = everything.filter(pa.compute.match_substring(everything["source_path"], name))
        for _ in range(3):
            t0 = time.perf_counter()
            found = tracks.video_tracks(mine["source_path"][0].as_py(), "v", mine.select(list(tracks.COLUMNS)),
                                        settings.annotate)
            t1 = time.perf_counter()
            tracks.fill_shards(str(out), STORAGE, marked_shards(str(out), STORAGE), found.columns, 4)
            t2 = time.perf_counter()
            tracks.write_video(str(out), STORAGE, name, found, args.seconds)
            t3 = time.perf_counter()
            passes.append((name, t1 - t0, t2 - t1, t3 - t2))
    cost = {k: sum(np.median([p[i] for p in passes if p[0] == n]) for n in scenes)
            for i, k in ((1, "link_smooth_summarise"), (2, "shard_columns"), (3, "tracks_parquet_and_timeline"))}
    results["track_pass_s"] = {k: round(v, 4) for k, v in cost.items()}
    results["track_share_of_annotate"] = round(sum(cost.values()) / total, 4)
    results["track_share_without_timeline"] = round((cost["link_smooth_summarise"] + cost["shard_columns"]) / total, 4)

    rows = [r for r in face_rows(out).to_pylist() if r["status"] == "ok"]
    for name, scene in scenes.items():
        ok = sorted((r for r in rows if r["source_path"].endswith(name)), key=lambda r: (r["frame_index"], r["face_index"]))
        ids = np.array([r["track_id"] for r in ok])
        times = np.array([r["timestamp_s"] for r in ok])
        probs = np.array([r["probs"] for r in ok])
        people = {t: sorted({scene.who(r["timestamp_s"], r["bbox"]) for r in ok if r["track_id"] == t}) for t in set(ids.tolist())}
        video: dict[str, Any] = {"face_rows": len(ok), "tracks": {int(t): p for t, p in sorted(people.items())},
                                 "tracks_pure": all(len(p) == 1 for p in people.values()),
                                 "accuracy_raw": accuracy(scene, ok, probs.argmax(axis=1)),
                                 "accuracy_smoothed_in_run": accuracy(scene, ok, np.array([r["smoothed_label"] for r in ok]))}
        truth = [scene.truth(scene.who(r["timestamp_s"], r["bbox"]), r["timestamp_s"]) for r in ok]
        video["changes_per_min"] = {"truth": changes_per_minute(ok, truth, args.seconds),
                                    "raw": changes_per_minute(ok, probs.argmax(axis=1), args.seconds)}
        for window in (1.0, 2.0, 3.0):
            smoothed = tracks.smooth(ids, times, probs, window).argmax(1)
            video[f"accuracy_smoothed_{window:g}s"] = accuracy(scene, ok, smoothed)
            video["changes_per_min"][f"smoothed_{window:g}s"] = changes_per_minute(ok, smoothed, args.seconds)
        results[name] = video
    print(json.dumps(results, indent=2))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "timelines" / "persistent.mp4.tracks.png", args.png)
    print(f"timeline: {args.png}")


if __name__ == "__main__":
    main()
