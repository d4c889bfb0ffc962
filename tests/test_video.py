"""Video reading (ferray.annotate.video) and annotation planning (ferray.annotate.media) on real videos, without Ray.

Also builds the mixed media archive that tests/test_annotate.py runs end to end: FER-2013 faces
pasted into larger canvases saved in five image formats, short videos written with OpenCV, and bad
media of every kind annotation must report.
"""

from __future__ import annotations

import io as pyio
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ferray.annotate import media, video
from ferray.data import io
from ferray.config import AnnotateSettings, StorageSettings
from ferray.annotate.media import MediaError, Probe
from ferray.annotate.ledger import Coverage, replaced
from ferray.executor.ledger import Ledger, ShardRecord
from ferray.data.schema import LABELS, VIDEO_SUMMARY_SCHEMA
from ferray.evaluate.report import CLASS_COLORS
from test_faces import SAMPLES, canvas, load_face

STORAGE = StorageSettings()
FRAME = (320, 240)  # video frame width, height


# --------------------------------------------------------------------------- real media builders


def face_frame(face: np.ndarray, shift: int, level: int) -> np.ndarray:
    """A 320×240 grey frame with a 48×48 FER face enlarged 3× (144 px, which HOG finds at upsample 1)."""
    frame = np.tile(np.linspace(level, min(255, level + 90), FRAME[0]), (FRAME[1], 1)).astype(np.uint8)
    big = cv2.resize(face, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    x, y = 60 + shift, 40
    frame[y : y + 144, x : x + 144] = big
    return frame


def blank_frame(level: int) -> np.ndarray:
    return np.full((FRAME[1], FRAME[0]), level, np.uint8)


def write_video(path: Path, fourcc: str, fps: float, frames: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, FRAME)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def numbered_frames(count: int) -> list[np.ndarray]:
    """Frames whose brightness encodes their index (for checking seeks): 0, 8, 16 …"""
    return [blank_frame((8 * k) % 256) for k in range(count)]


@dataclass(frozen=True)
class Expected:
    """What the mixed archive holds, for the end-to-end checks."""

    canvases: dict[str, str]  # relpath → true label name, one face each
    two_faces: str
    no_face: str
    videos: dict[str, tuple[float, int, int]]  # relpath → (fps, frames with a face, frames in all)
    bad: dict[str, str]  # relpath → expected status

    @property
    def all(self) -> set[str]:
        return set(self.canvases) | {self.two_faces, self.no_face} | set(self.videos) | set(self.bad)


def build_media(root: Path, seed: int = 0) -> Expected:
    """Write the mixed archive under `root` (images in five formats, two videos, bad media)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    by_label = {label: [p for p in SAMPLES if p.parent.name == label] for label in LABELS}
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF"), ("jpeg", "JPEG"),
               ("png", "PNG")]
    canvases: dict[str, str] = {}
    for index, label in enumerate(LABELS):
        ext, fmt = formats[index]
        image, _ = canvas(load_face(by_label[label][0]), rng)
        relpath = f"photos/{'album/' if index % 2 else ''}{label}-{index}.{ext}"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(root / relpath, format=fmt)
        canvases[relpath] = label
    pair = np.full((240, 440), 150, np.uint8)
    for slot, path in enumerate((by_label["happy"][1], by_label["neutral"][1])):
        big = cv2.resize(load_face(path), None, fx=3.5 - slot * 0.5, fy=3.5 - slot * 0.5, interpolation=cv2.INTER_CUBIC)
        pair[20 : 20 + big.shape[0], 20 + slot * 230 : 20 + slot * 230 + big.shape[1]] = big
    Image.fromarray(pair).save(root / "photos/pair.png")
    Image.fromarray(np.tile(np.linspace(30, 220, 300), (200, 1)).astype(np.uint8)).save(root / "photos/landscape.jpg")

    face = load_face(by_label["surprise"][1])
    clip = [face_frame(face, k % 5, 40) for k in range(24)] + [blank_frame(90)] * 6
    write_video(root / "clips/talk.mp4", "mp4v", 10.0, clip)
    other = [face_frame(load_face(by_label["sad"][1]), 2, 70) for _ in range(12)] + [blank_frame(30)] * 4
    write_video(root / "clips/old/interview.avi", "MJPG", 8.0, other)

    good_jpg = (root / next(r for r in canvases if r.endswith(".jpg"))).read_bytes()
    good_mp4 = (root / "clips/talk.mp4").read_bytes()
    bad = {
        "bad/corrupt.jpg": "decode:truncated",
        "bad/empty.jpg": "decode:empty",
        "bad/empty.mp4": "video:empty",
        "bad/truncated.mp4": "video:unreadable",
        "bad/notes.xyz": "media:unsupported",
        "bad/fake.png": "decode:not_image",
    }
    (root / "bad").mkdir()
    (root / "bad/corrupt.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/empty.mp4").write_bytes(b"")
    (root / "bad/truncated.mp4").write_bytes(good_mp4[: len(good_mp4) // 2])
    (root / "bad/notes.xyz").write_text("not media\n")
    (root / "bad/fake.png").write_text("this is a text file with an image's name\n" * 4)
    return Expected(canvases, "photos/pair.png", "photos/landscape.jpg",
                    {"clips/talk.mp4": (10.0, 24, 30), "clips/old/interview.avi": (8.0, 12, 16)}, bad)


def zip_folder(root: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
    return target


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 40 numbered frames at 10 fps in three containers."""
    folder = tmp_path_factory.mktemp("numbered")
    out = {}
    for name, fourcc in (("n.avi", "MJPG"), ("n.mp4", "mp4v"), ("n.mkv", "XVID")):
        write_video(folder / name, fourcc, 10.0, numbered_frames(40))
        out[name] = folder / name
    return out


# --------------------------------------------------------------------------- sampling and planning


@pytest.mark.parametrize(("video_fps", "fps", "expected"), [
    (10.0, 2.0, [0, 5, 10, 15, 20, 25]),
    (29.97, 2.0, [0, 15, 30, 45]),
    (8.0, 3.0, [0, 3, 5, 8, 11, 13]),
    (5.0, 30.0, [0, 1, 2, 3, 4, 5]),  # asking for more than the video has: every frame, once
])
def test_sampling_follows_the_rate(video_fps: float, fps: float, expected: list[int]) -> None:
    step = media.sample_step(video_fps, AnnotateSettings(fps=fps))
    frames = list(media.sampled_frames(0, expected[-1] + 1, step))
    assert frames == expected
    # Each sample is the frame nearest its ideal time k / fps.
    ideal = np.arange(len(frames)) / min(fps, video_fps)
    assert np.all(np.abs(np.array(frames) / video_fps - ideal) <= 0.5 / video_fps + 1e-9)


def test_segments_neither_drop_nor_repeat_a_sample() -> None:
    settings = AnnotateSettings(fps=3.0, segment_seconds=1.3)
    file = io.TreeFile("v.mp4", "v.mp4", 1000)
    units = media.video_units(file, Probe(frames=300, fps=29.97), settings)
    assert [u.segment for u in units] == list(range(len(units))) and len(units) == 8
    assert units[-1].end is None and all(u.segments == 8 for u in units)
    step = media.sample_step(29.97, settings)
    pieces = [f for u in units for f in media.sampled_frames(u.start, 300 if u.end is None else u.end, step)]
    assert pieces == [f for f in media.sampled_frames(0, 300, step)]
    assert sum(u.cost for u in units) == pytest.approx(len(pieces), abs=len(units))


def test_every_nth_frame() -> None:
    step = media.sample_step(25.0, AnnotateSettings(every_nth=7))
    assert list(media.sampled_frames(10, 40, step)) == [14, 21, 28, 35]


def test_files_that_are_not_media_become_status_units() -> None:
    assert media.file_unit(io.TreeFile("a/b.TIFF", "a/b.TIFF", 10)).media == "image"
    odd = media.file_unit(io.TreeFile("a/readme.md", "a/readme.md", 10))
    assert (odd.media, odd.status) == (None, "media:unsupported") and ".md" in odd.error
    unsafe = media.file_unit(io.TreeFile(None, "../escape.jpg", 10))
    assert unsafe.status == "media:unsafe_path" and unsafe.relpath == "../escape.jpg"
    empty = media.video_units(io.TreeFile("e.mp4", "e.mp4", 0), None, AnnotateSettings())
    assert [(u.status, u.segments) for u in empty] == [("video:empty", 1)]
    broken = media.video_units(io.TreeFile("t.mp4", "t.mp4", 9), MediaError("video", "unreadable", "x"), AnnotateSettings())
    assert broken[0].status == "video:unreadable"
    # An I/O failure while probing is left for the worker to retry.
    flaky = media.video_units(io.TreeFile("t.mp4", "t.mp4", 9), MediaError("read", "error", "x"), AnnotateSettings())
    assert flaky[0].status == "ok" and flaky[0].end is None


def test_packing_is_restartable() -> None:
    """Removing finished shards and packing the rest again cuts the same shards (same names)."""
    settings = AnnotateSettings(shard_units=4, shard_frames=10)
    units = [media.Unit(f"f{i:02d}.jpg", f"f{i:02d}.jpg", 1, "image", cost=1 + (i % 4) * 2) for i in range(30)]
    first = media.pack(units, settings)
    assert all(len(s) <= 4 and (sum(u.cost for u in s) <= 10 or len(s) == 1) for s in first)
    finished = {0, 2, 3, len(first) - 2}
    rest = [u for i, shard in enumerate(first) if i not in finished for u in shard]
    again = media.pack(rest, settings)
    assert [media.shard_identity("k", s) for s in again] == [
        media.shard_identity("k", s) for i, s in enumerate(first) if i not in finished]


def test_ledger_covers_a_video_only_when_every_segment_is_done() -> None:
    record = ShardRecord("part-0", "k", (("v.mp4", 5, 0, 3), ("v.mp4", 5, 2, 3), ("a.jpg", 1, 0, 1)), {})
    ledger = Ledger([record], "k")
    covered = Coverage(ledger)
    assert covered(io.TreeFile("a.jpg", "a.jpg", 1))
    assert not covered(io.TreeFile("a.jpg", "a.jpg", 2))  # replaced: another size
    assert not covered(io.TreeFile("v.mp4", "v.mp4", 5))
    done = Ledger([record, ShardRecord("part-1", "k", (("v.mp4", 5, 1, 3),), {})], "k")
    assert Coverage(done)(io.TreeFile("v.mp4", "v.mp4", 5))
    assert not Coverage(Ledger([record], "other-model"))(io.TreeFile("a.jpg", "a.jpg", 1))
    assert [r.shard for r in ledger.holding(replaced({"a.jpg": 2}))] == ["part-0"]


# --------------------------------------------------------------------------- OpenCV reading


@pytest.mark.parametrize("name", ["n.avi", "n.mp4", "n.mkv"])
def test_segments_read_the_frames_a_full_pass_reads(numbered: dict[str, Path], name: str) -> None:
    tree = io.Tree(str(numbered[name].parent), STORAGE)
    settings = AnnotateSettings(fps=2.5)
    with video.capture(tree, name, settings) as cap:
        found = video.probe(cap)
        assert found.fps == pytest.approx(10.0) and found.frames == 40
        step = media.sample_step(found.fps, settings)
        whole = {k: f.mean() for k, f in video.SegmentReader(cap, 0, None, step)}
    assert sorted(whole) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    file = io.TreeFile(name, name, numbered[name].stat().st_size)
    pieces = {}
    for unit in media.video_units(file, found, AnnotateSettings(fps=2.5, segment_seconds=1.1)):
        with video.capture(tree, name, settings) as cap:
            reader = video.SegmentReader(cap, unit.start, unit.end, step)
            pieces.update({k: f.mean() for k, f in reader})
            assert not reader.ended_early
    assert pieces.keys() == whole.keys()
    # Each sampled frame is the one its index names (brightness 8·k, give or take the codec).
    assert all(abs(pieces[k] - whole[k]) < 2 and abs(whole[k] - (8 * k) % 256) < 4 for k in whole)


def test_streamed_and_copied_members_read_like_files(numbered: dict[str, Path], tmp_path: Path) -> None:
    archive = zip_folder(numbered["n.mp4"].parent, tmp_path / "videos.zip")
    tree = io.Tree(str(archive), STORAGE)
    results = []
    for mode in ("stream", "copy"):
        settings = AnnotateSettings(video_io=mode, copy_chunk_bytes=64 * 1024)
        with video.capture(tree, "n.mp4", settings) as cap:
            assert video.probe(cap) == Probe(40, 10.0)
            results.append([k for k, _ in video.SegmentReader(cap, 12, 30, 4.0)])
    assert results[0] == results[1] == [12, 16, 20, 24, 28]
    assert not list(tmp_path.glob("ferray-video-*"))


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "video:unreadable"),
    (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "video:unreadable"),
    (b"plain text, not a video\n" * 50, "video:unreadable"),
])
def test_bad_videos_are_named(tmp_path: Path, data: bytes, expected: str) -> None:
    (tmp_path / "bad.mp4").write_bytes(data)
    result = video.probe_member(io.Tree(str(tmp_path), STORAGE), "bad.mp4", AnnotateSettings())
    assert isinstance(result, MediaError) and result.status == expected


def test_truncated_video_after_its_header_ends_early(numbered: dict[str, Path], tmp_path: Path) -> None:
    """An AVI cut in the middle keeps its header: reading stops early, and says so."""
    data = numbered["n.avi"].read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    tree = io.Tree(str(tmp_path), STORAGE)
    with video.capture(tree, "cut.avi", AnnotateSettings()) as cap:
        reader = video.SegmentReader(cap, 0, 40, 1.0)
        frames = [k for k, _ in reader]
    assert 5 < len(frames) < 40 and reader.ended_early


def test_missing_member_is_a_read_status(tmp_path: Path) -> None:
    result = video.probe_member(io.Tree(str(tmp_path), STORAGE), "gone.mp4", AnnotateSettings(video_io="copy"))
    assert isinstance(result, MediaError)
    # A local folder opens in place: OpenCV reports the missing file as unreadable.
    assert result.status == "video:unreadable"


# --------------------------------------------------------------------------- summaries


def _rows(entries: list[tuple[int, str, int | None, int | None]]) -> pa.Table:
    """Rows of a video: (frame, status, face_index, label)."""
    probs = [[0.9 if k == label else 0.1 / 6 for k in range(7)] if label is not None else None for _, _, _, label in entries]
    return pa.table({
        "frame_index": [f for f, *_ in entries],
        "timestamp_s": [None if f is None else f / 10 for f, *_ in entries],
        "status": [s for _, s, _, _ in entries],
        "face_index": [i for _, _, i, _ in entries],
        "label": [lab for *_, lab in entries],
        "confidence": [0.9 if lab is not None else None for *_, lab in entries],
        "probs": probs,
    })


def test_summary_shares_time_between_expressions() -> None:
    rows = _rows([(0, "ok", 0, 3), (0, "ok", 1, 6), (5, "ok", 0, 3), (10, "align:no_face", None, None),
                  (15, "ok", 0, 4), (None, "video:short_read", None, None)])
    row = video.summarize("s3://b/v.mp4", "v1", rows, "OUT/timelines/v.mp4.png")
    assert row["frames_sampled"] == 4 and row["frames_with_face"] == 3
    assert row["share_happy"] == 0.5 and row["share_sad"] == 0.25 and row["share_no_face"] == 0.25
    assert row["dominant_label_name"] == "happy" and row["max_faces_per_frame"] == 2
    assert row["faces_per_frame"] == 1.0 and row["error_rows"] == 1 and row["duration_s"] == pytest.approx(2.0)
    assert sum(row[f"share_{n}"] for n in LABELS) + row["share_no_face"] == pytest.approx(1.0)
    assert video.summary_table(row).schema == VIDEO_SUMMARY_SCHEMA
    png = video.timeline_png("v.mp4", rows)
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert image.shape == (315, 900, 3)  # matplotlib, 10 × 3.5 in at 90 dpi: one lane (no tracks given)
    colours = {tuple(c) for c in np.unique(image.reshape(-1, 3), axis=0)}
    # The lane shows the largest face's labels (happy, sad) in the report's class colours, and the no-face gap.
    for name in ("happy", "sad"):
        hex_colour = CLASS_COLORS[LABELS.index(name)]
        assert tuple(int(hex_colour[k : k + 2], 16) for k in (1, 3, 5)) in colours, name
    assert (224, 224, 224) in colours


def test_summary_of_an_unreadable_video() -> None:
    row = video.summarize("v.mp4", "v1", _rows([(None, "video:unreadable", None, None)]), "t.png")
    assert row["status"] == "video:unreadable" and row["frames_sampled"] == 0 and row["timeline"] is None
    assert row["dominant_label"] is None


def test_media_builder_writes_what_it_promises(tmp_path: Path) -> None:
    expected = build_media(tmp_path)
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == expected.all
    for relpath, (fps, _, frames) in expected.videos.items():
        cap = cv2.VideoCapture(str(tmp_path / relpath))
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(fps) and cap.get(cv2.CAP_PROP_FRAME_COUNT) == frames
        cap.release()
    assert Image.open(pyio.BytesIO((tmp_path / "photos/album/disgust-1.png").read_bytes())).format == "PNG"
