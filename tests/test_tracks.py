"""Face tracks (ferray.annotate.tracks): the linker, smoothing and summaries as pure functions, then `ferray
annotate` on generated videos of real faces: two people side by side whose expressions change at known
times, two people crossing, a person leaving and coming back, a face missed for a frame; cut into
one-second segments on two actors, and whole; rerun and resumed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from ferray.annotate import tracks
from ferray import annotate
from ferray.data import io
from ferray.config import AnnotateSettings, StorageSettings, load_settings
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, TRACK_SUMMARY_SCHEMA, VIDEO_SUMMARY_SCHEMA
from scenes import Person, Scene, moving, still
from test_faces import FACES_DIR, load_face

STORAGE = StorageSettings()


def boxes_at(*centres: tuple[float, float], width: float = 100) -> list[list[float]]:
    return [[x - width / 2, y - width / 2, width, width] for x, y in centres]


def linked(frames: list[list[tuple[float, float]]], step: float = 0.5, **knobs: Any) -> list[list[int]]:
    """Track ids, frame by frame, of faces given as centres (100 px boxes), one frame every `step` s."""
    index = [k for k, faces in enumerate(frames) for _ in faces]
    boxes = [b for faces in frames for b in boxes_at(*faces)] or np.zeros((0, 4))
    ids = tracks.link(np.array(index), np.array(index) * step, np.array(boxes), **knobs).tolist()
    out, at = [], 0
    for faces in frames:
        out.append(ids[at : at + len(faces)])
        at += len(faces)
    return out


# --------------------------------------------------------------------------- the linker


def test_two_still_faces_keep_their_tracks_whatever_their_order() -> None:
    left, right = (100, 100), (400, 110)
    frames = [[left, right], [right, left], [(104, 98), (397, 112)], [right, left]]
    assert linked(frames) == [[0, 1], [1, 0], [0, 1], [1, 0]]


def test_a_missed_detection_keeps_the_track_and_a_long_absence_ends_it() -> None:
    a, b = (100, 100), (400, 100)
    # b missed at frames 2 and 3 (1 s unseen): same track; then gone 2.5 s: a new one.
    frames = [[a, b], [a, b], [a], [a], [a, b], [a], [a], [a], [a], [a], [a, b]]
    ids = linked(frames, max_gap_s=2.0)
    assert [f[1] for f in ids if len(f) == 2] == [1, 1, 1, 2]
    assert all(f[0] == 0 for f in ids)


def test_people_entering_get_new_tracks_in_order() -> None:
    frames = [[(100, 100)], [(100, 100), (300, 100)], [(100, 100), (300, 100), (500, 100)]]
    assert linked(frames) == [[0], [0, 1], [0, 1, 2]]


def test_crossing_faces_follow_their_motion() -> None:
    """Two faces moving through each other: at the crossing their boxes coincide and the nearer-to-the-
    prediction face wins; the velocity carries each track past the other. One frame sees only one."""
    frames = []
    for k in range(12):
        a, b = (60 + 40 * k, 100), (500 - 40 * k, 110)
        frames.append([a] if k == 6 else [b, a] if k % 2 else [a, b])
    ids = linked(frames)
    for k, faces in enumerate(frames):
        truth = [0 if x == 60 + 40 * k else 1 for x, _ in faces]
        assert ids[k] == truth, (k, ids[k])


def test_a_far_jump_or_a_size_change_is_someone_else() -> None:
    jump = [[(100, 100)], [(400, 100)]]  # three face widths in half a second
    assert linked(jump) == [[0], [1]]
    assert linked(jump, max_shift=4.0) == [[0], [0]]
    index = np.array([0, 1])
    grown = np.array([[50, 50, 100, 100], [25, 25, 250, 250]])  # same centre, 2.5× the width
    assert tracks.link(index, index * 0.5, grown).tolist() == [0, 1]


def test_linking_is_deterministic_and_order_free() -> None:
    rng = np.random.default_rng(3)
    frames = [[(100 + rng.normal(0, 5), 100), (300, 100 + rng.normal(0, 5)), (500, 100)] for _ in range(20)]
    index = np.array([k for k, f in enumerate(frames) for _ in f])
    boxes = np.array([b for f in frames for b in boxes_at(*f)])
    ids = tracks.link(index, index * 0.5, boxes)
    shuffled = rng.permutation(len(index))
    back = np.empty_like(ids)
    back[shuffled] = tracks.link(index[shuffled], index[shuffled] * 0.5, boxes[shuffled])
    # The same frames in another row order: the same tracks (ids may follow first-seen order in each frame).
    assert len(set(zip(ids.tolist(), back.tolist()))) == 3
    assert tracks.link(np.zeros(0), np.zeros(0), np.zeros((0, 4))).tolist() == []


# --------------------------------------------------------------------------- smoothing and summaries


def test_smoothing_is_a_centred_mean_within_each_track() -> None:
    ids = np.array([0, 0, 0, 0, 1, 1])
    times = np.array([0.0, 0.5, 1.0, 1.5, 0.0, 0.5])
    probs = np.zeros((6, 7))
    probs[[0, 1, 3], 3] = 1  # happy, happy, (surprise), happy: one flicker
    probs[2, 5] = 1
    probs[4:, 6] = 1
    out = tracks.smooth(ids, times, probs, 1.0)  # ±0.5 s: three samples
    assert out[2].argmax() == 3 and out[2, 3] == pytest.approx(2 / 3) and out[2, 5] == pytest.approx(1 / 3)
    assert out[0, 3] == pytest.approx(1.0)  # the window is cut at the track's start
    assert np.allclose(out[4:], probs[4:]), "another track's samples never mix in"
    assert np.allclose(out.sum(axis=1), 1.0)
    assert np.array_equal(tracks.smooth(ids, times, probs, 0.0), probs)
    # Row order does not matter.
    order = np.array([5, 2, 0, 4, 3, 1])
    assert np.allclose(tracks.smooth(ids[order], times[order], probs[order], 1.0), out[order])


def test_track_summaries_count_time_and_expressions() -> None:
    ids = np.array([0, 0, 0, 1, 0, 1])
    times = np.array([0.0, 0.5, 1.5, 1.5, 2.0, 2.0])  # track 0 missed at 1.0
    boxes = np.array([[10, 10, 100, 100]] * 6, np.float64)
    labels = np.array([3, 3, 6, 4, 3, 4])
    sampled = np.arange(0, 2.5, 0.5)
    rows = tracks.summarize("v.mp4", "v1", ids, times, boxes, labels, np.full(6, 0.8), sampled, 1.5)
    first, second = rows
    assert (first["first_seen_s"], first["last_seen_s"], first["seconds_on_screen"]) == (0.0, 2.0, 2.5)
    assert first["frames_seen"] == 4 and first["frames_missed"] == 1
    assert first["share_happy"] == 0.75 and first["share_neutral"] == 0.25 and first["dominant_label_name"] == "happy"
    assert second["seconds_on_screen"] == 1.0 and second["frames_missed"] == 0 and second["share_sad"] == 1.0
    assert pa.Table.from_pylist(rows, schema=TRACK_SUMMARY_SCHEMA).num_rows == 2


def _video_rows(entries: list[tuple[int, int | None, list[int] | None, int | None]]) -> pa.Table:
    """A video's rows: (frame, face_index, bbox, label); no face index = a frame without a face."""
    probs = [[0.9 if k == lab else 0.1 / 6 for k in range(7)] if lab is not None else None for *_, lab in entries]
    return pa.table({
        "id": [f"r{k}" for k in range(len(entries))],
        "frame_index": [f for f, *_ in entries],
        "timestamp_s": [f / 10 for f, *_ in entries],
        "face_index": pa.array([i for _, i, _, _ in entries], pa.int32()),
        "bbox": pa.array([b for _, _, b, _ in entries], pa.list_(pa.int32(), 4)),
        "label": pa.array([lab for *_, lab in entries], pa.int8()),
        "confidence": pa.array([0.9 if lab is not None else None for *_, lab in entries], pa.float32()),
        "probs": pa.array(probs, pa.list_(pa.float32(), 7)),
        "status": ["ok" if i is not None else "align:no_face" for _, i, _, _ in entries],
    })


def test_a_videos_tracks_fill_its_shards_beside_the_raw_columns(tmp_path: Path) -> None:
    left, right = [10, 10, 100, 100], [300, 10, 100, 100]
    rows = _video_rows([(0, 0, left, 3), (0, 1, right, 6), (5, 0, right, 6), (5, 1, left, 5), (10, None, None, None),
                        (15, 0, left, 3)])
    found = tracks.video_tracks("v.mp4", "v1", rows, AnnotateSettings(smooth_seconds=1.0))
    by_id = {r["id"]: r for r in found.columns.to_pylist()}
    assert [by_id[f"r{k}"]["track_id"] for k in (0, 1, 2, 3, 5)] == [0, 1, 1, 0, 0]
    assert by_id["r3"]["smoothed_label_name"] == "happy", "the surprise flicker of the left face is smoothed away"
    assert [s["frames_missed"] for s in found.summaries] == [1, 0]
    off = tracks.video_tracks("v.mp4", "v1", rows, AnnotateSettings(smooth_seconds=0))
    assert off.columns["smoothed_label"].null_count == 5 and off.columns["track_id"].null_count == 0

    # Into a shard: its other rows (an image, another video) untouched, raw columns unchanged.
    shard = pa.Table.from_pylist([
        {"id": "r1", "unit": "v.mp4@0/1", "source_path": "v.mp4", "status": "ok", "model_version": "v1", "label": 6},
        {"id": "img", "unit": "a.jpg", "source_path": "a.jpg", "status": "ok", "model_version": "v1", "label": 2},
    ], schema=ANNOTATION_SCHEMA)
    filled = tracks.fill(shard, found.columns)
    assert filled is not None and filled.schema == ANNOTATION_SCHEMA
    assert filled["track_id"].to_pylist() == [1, None] and filled["label"].to_pylist() == [6, 2]
    assert filled["smoothed_label"].to_pylist() == [6, None]
    assert tracks.fill(shard.slice(1), found.columns) is None
    # A shard written before the track columns existed gets them.
    old = shard.drop_columns([f.name for f in tracks.TRACK_FIELDS])
    assert tracks.fill(old, found.columns).equals(filled)

    png = tracks.timeline_png("v.mp4", found, 2.0)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] > 600 and len(np.unique(image.reshape(-1, 3), axis=0)) > 8

    empty = tracks.video_tracks("v.mp4", "v1", rows.slice(4, 1), AnnotateSettings())
    assert empty.count == 0 and empty.columns.num_rows == 0 and empty.summary_table().num_rows == 0


# --------------------------------------------------------------------------- end to end, real faces


def face(name: str) -> np.ndarray:
    return load_face(FACES_DIR / name)


# Faces the shipped model labels confidently once pasted 3× into a frame and aligned (p ≥ 0.87).
HAPPY, HAPPY2 = face("happy/Training_31640219.jpg"), face("happy/Training_66392847.jpg")
NEUTRAL, NEUTRAL2 = face("neutral/Training_46391521.jpg"), face("neutral/Training_58936448.jpg")
SURPRISE = face("surprise/Training_95708850.jpg")
LEFT, RIGHT = still(40, 48), still(296, 48)

SCENES: dict[str, Scene] = {
    # Two people side by side; the left one happy then surprised at 3 s, the right one neutral then happy at 2 s.
    "interview.mp4": Scene([Person("left", [(0, 3, "happy", HAPPY), (3, 6, "surprise", SURPRISE)], LEFT),
                            Person("right", [(0, 2, "neutral", NEUTRAL), (2, 6, "happy", HAPPY2)], RIGHT)],
                           seconds=6, jitter=2, seed=1),
    # Two people walking through each other (the second drawn over the first where they overlap).
    "crossing.mp4": Scene([Person("a", [(0, 6, "happy", HAPPY)], moving(10, 326, 0, 6)),
                           Person("b", [(0, 6, "neutral", NEUTRAL2)], moving(326, 10, 96, 6))], seconds=6, seed=2),
    # The right one leaves at 2 s and comes back surprised at 5 s (longer than track_gap_seconds: a new track).
    "leaving.mp4": Scene([Person("left", [(0, 8, "neutral", NEUTRAL)], LEFT),
                          Person("right", [(0, 2, "happy", HAPPY2), (5, 8, "surprise", SURPRISE)], RIGHT,
                                 hidden=[(2, 5)])], seconds=8, jitter=1, seed=3),
    # The left face is missing from one sampled frame (1.5 s) only.
    "missed.mp4": Scene([Person("left", [(0, 4, "neutral", NEUTRAL)], LEFT, hidden=[(1.5, 1.6)]),
                         Person("right", [(0, 4, "happy", HAPPY)], RIGHT)], seconds=4, seed=4),
}


def track_settings(**knobs: Any) -> Any:
    return load_settings(ray={"progress_bars": False}, annotate={"segment_seconds": 1.0, "shard_frames": 8, **knobs})


def video_rows(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every ok video row of OUT by video name, in frame and face order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for uri in io.completed_shards(str(out), STORAGE):
        table = io.read_parquet(uri, STORAGE)
        assert table.schema == ANNOTATION_SCHEMA
        for row in table.to_pylist():
            if row["media_type"] == "video":
                rows.setdefault(row["source_path"].rsplit("/", 1)[-1], []).append(row)
    return {name: sorted(r, key=lambda r: (r["frame_index"], r["face_index"])) for name, r in rows.items()}


def track_rows(out: Path, name: str) -> list[dict[str, Any]]:
    table = io.read_parquet(str(out / "tracks" / f"{name}.parquet"), STORAGE)
    assert table.schema == TRACK_SUMMARY_SCHEMA
    return table.to_pylist()


@pytest.fixture(scope="module")
def scenes_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "source"
    for name, scene in SCENES.items():
        scene.write(root / name)
    return root


@pytest.fixture(scope="module")
def segmented(ray_session: None, scenes_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The videos cut into one-second segments, spread over shards and both actors."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    summary = annotate.run(track_settings(), "default", str(scenes_source), str(out))
    assert summary.shards_written >= 4 and summary.extra["video_summaries_written"] == len(SCENES)
    return out


def by_person(name: str, rows: list[dict[str, Any]]) -> dict[str, set[int]]:
    """Person → the track ids of the rows that show them."""
    scene = SCENES[name]
    found: dict[str, set[int]] = {}
    for row in rows:
        found.setdefault(scene.who(row["timestamp_s"], row["bbox"]), set()).add(row["track_id"])
    return found


def test_every_video_face_row_has_a_track_and_smoothed_labels(segmented: Path) -> None:
    rows = video_rows(segmented)
    assert set(rows) == set(SCENES)
    for name, mine in rows.items():
        assert len({r["unit"] for r in mine}) > 2, "the video was cut into segments"
        for row in mine:
            assert row["track_id"] is not None and row["smoothed_label"] is not None, (name, row)
            assert np.sum(row["smoothed_probs"]) == pytest.approx(1.0, abs=1e-4)
            assert row["smoothed_label"] == int(np.argmax(row["smoothed_probs"]))
            assert row["smoothed_label_name"] == LABELS[row["smoothed_label"]]
            assert row["label"] == int(np.argmax(row["probs"])), "the raw columns are the model's own"


def test_two_people_side_by_side_one_track_each_with_the_known_expressions(segmented: Path) -> None:
    rows = video_rows(segmented)["interview.mp4"]
    people = by_person("interview.mp4", rows)
    assert {k: len(v) for k, v in people.items()} == {"left": 1, "right": 1}
    (left,), (right,) = people["left"], people["right"]
    summaries = {s["track_id"]: s for s in track_rows(segmented, "interview.mp4")}
    assert set(summaries) == {left, right}
    for track, shares in ((left, {"happy": 0.5, "surprise": 0.5}), (right, {"neutral": 1 / 3, "happy": 2 / 3})):
        s = summaries[track]
        assert (s["first_seen_s"], s["last_seen_s"], s["seconds_on_screen"], s["frames_seen"]) == (0.0, 5.5, 6.0, 12)
        assert s["frames_missed"] == 0 and s["smoothing_s"] == 2.0
        for label in LABELS:
            assert s[f"share_{label}"] == pytest.approx(shares.get(label, 0.0), abs=0.09), (track, label)
    # Frame by frame, the smoothed label follows the known times (raw ones may flicker).
    scene = SCENES["interview.mp4"]
    right_rows = [r for r in rows if r["track_id"] == right]
    hits = [r["smoothed_label_name"] == scene.truth("right", r["timestamp_s"]) for r in right_rows]
    assert sum(hits) >= len(hits) - 1
    summary = io.read_parquet(str(segmented / "videos/interview.mp4.parquet"), STORAGE)
    assert summary.schema == VIDEO_SUMMARY_SCHEMA
    row = summary.to_pylist()[0]
    assert row["tracks"] == 2 and row["tracks_timeline"].endswith("timelines/interview.mp4.tracks.png")
    png = (segmented / "timelines/interview.mp4.tracks.png").read_bytes()
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None


def test_two_people_crossing_keep_their_tracks(segmented: Path) -> None:
    rows = video_rows(segmented)["crossing.mp4"]
    people = by_person("crossing.mp4", rows)
    assert {k: len(v) for k, v in people.items()} == {"a": 1, "b": 1}, people
    assert people["a"] != people["b"]
    assert len(track_rows(segmented, "crossing.mp4")) == 2


def test_a_person_who_leaves_and_comes_back_gets_a_new_track(segmented: Path) -> None:
    rows = video_rows(segmented)["leaving.mp4"]
    people = by_person("leaving.mp4", rows)
    assert len(people["left"]) == 1 and len(people["right"]) == 2
    summaries = {s["track_id"]: s for s in track_rows(segmented, "leaving.mp4")}
    assert len(summaries) == 3
    (left,) = people["left"]
    first, second = sorted(people["right"])
    assert (summaries[left]["first_seen_s"], summaries[left]["last_seen_s"]) == (0.0, 7.5)
    assert (summaries[first]["first_seen_s"], summaries[first]["last_seen_s"]) == (0.0, 1.5)
    assert (summaries[second]["first_seen_s"], summaries[second]["last_seen_s"]) == (5.0, 7.5)
    assert second == 2 and summaries[second]["seconds_on_screen"] == 3.0, "the newest track"
    assert summaries[first]["dominant_label_name"] == "happy" and summaries[second]["dominant_label_name"] == "surprise"


def test_a_face_missed_for_a_frame_keeps_its_track(segmented: Path) -> None:
    rows = video_rows(segmented)["missed.mp4"]
    people = by_person("missed.mp4", rows)
    assert {k: len(v) for k, v in people.items()} == {"left": 1, "right": 1}
    assert [r["timestamp_s"] for r in rows if r["track_id"] in people["left"]] == [
        k / 2 for k in range(8) if k != 3], "the face is missing at 1.5 s"
    summaries = {s["track_id"]: s for s in track_rows(segmented, "missed.mp4")}
    (left,) = people["left"]
    assert summaries[left]["frames_missed"] == 1 and summaries[left]["seconds_on_screen"] == 4.0
    assert summaries[left]["frames_seen"] == 7


def test_tracks_do_not_depend_on_segments_and_survive_reruns(segmented: Path, scenes_source: Path,
                                                             tmp_path: Path) -> None:
    """The same videos as one segment each: the same track ids and smoothed labels, row for row. A rerun
    writes nothing; a run resumed after losing a shard redoes it and puts the same tracks back."""
    def tracks_of(out: Path) -> dict[str, tuple[Any, ...]]:
        return {r["id"]: (r["track_id"], r["smoothed_label"]) for rows in video_rows(out).values() for r in rows}

    expected = tracks_of(segmented)
    whole = tmp_path / "whole"
    annotate.run(track_settings(segment_seconds=60.0), "default", str(scenes_source), str(whole))
    assert tracks_of(whole) == expected

    out = tmp_path / "resumed"
    shutil.copytree(segmented, out)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert annotate.run(track_settings(), "default", str(scenes_source), str(out)).shards_written == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files, "a rerun writes nothing"
    # A crash lost the shard holding a middle segment of leaving.mp4 (its marker and data).
    stats = [io.read_json(str(p), STORAGE) for p in (out / "_stats").glob("*.json")]
    lost = next(s["shard"] for s in stats if any(u[0] == "leaving.mp4" and u[2] == 3 for u in s["units"]))
    (out / "_markers" / f"{lost}.json").unlink()
    (out / f"{lost}.parquet").unlink()
    resumed = annotate.run(track_settings(), "default", str(scenes_source), str(out))
    assert resumed.shards_written == 1 and resumed.extra["video_summaries_written"] >= 1
    assert tracks_of(out) == expected
    # Smoothing off (a setting of the track pass only): no shard is redone, smoothed columns emptied.
    off = annotate.run(track_settings(smooth_seconds=0), "default", str(scenes_source), str(out))
    assert off.shards_written == 0 and off.extra["video_summaries_written"] == len(SCENES)
    assert {v[1] for v in tracks_of(out).values()} == {None}
    assert {k: v[0] for k, v in tracks_of(out).items()} == {k: v[0] for k, v in expected.items()}
