"""`ferray annotate` end to end on real media (FER-2013 faces on canvases, OpenCV videos, bad files):
local folder, moto S3 prefix and zip; every input accounted for, stats agree, reruns incremental."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ferray import annotate
from ferray.annotate import plan
from ferray.annotate.detect import DRAFT_SCHEMA, FaceFinder
from ferray.annotate.job import Job, ModelRef, face_settings, resolve_model, run_key
from ferray.annotate.label import Labeller
from ferray.annotate.plan import plan_units
from ferray.annotate.stage import Actors, plan_actors
from ferray.data import io
from ferray.cli import EXIT_CANNOT_RUN, main
from ferray.config import Settings, StorageSettings, load_settings
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, VIDEO_SUMMARY_SCHEMA
from ferray.model import artifact
from test_faces import SAMPLES, load_face
from test_video import Expected, build_media, zip_folder

# Small shards and one-second segments, so that shards and video segments spread over both actors.
KNOBS = {"segment_seconds": 1.0, "shard_frames": 8}


def settings_for(**annotate_knobs: Any) -> Settings:
    return load_settings(ray={"progress_bars": False}, annotate={**KNOBS, **annotate_knobs})


def all_rows(out: str, storage: StorageSettings) -> pa.Table:
    """Every row of OUT, ok and quarantined, from the marked shards only."""
    sink = io.ShardSink(out, storage)
    tables = []
    for uri in io.completed_shards(out, storage):
        shard = uri.rsplit("/", 1)[-1][: -len(".parquet")]
        tables.append(io.read_parquet(uri, storage))
        if io.exists(sink.quarantine_uri(shard), storage):
            tables.append(io.read_parquet(sink.quarantine_uri(shard), storage))
    return pa.concat_tables(tables)


def relpath_of(source_path: str, root: str) -> str:
    return source_path[len(root.rstrip("/")) + 1 :]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("media") / "archive"
    return root, build_media(root)


@pytest.fixture(scope="module")
def folder_run(ray_session: None, model_dir: Path, media_root: tuple[Path, Expected],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root, _ = media_root
    out = tmp_path_factory.mktemp("annotated") / "out"
    summary = annotate.run(settings_for(), str(model_dir), str(root), str(out))
    return {"summary": summary, "out": out, "rows": all_rows(str(out), StorageSettings())}


def check_run(rows: pa.Table, root: str, expected: Expected, model_dir: Path, out: str, storage: StorageSettings) -> None:
    """What every run must show, wherever SOURCE and OUT live."""
    assert rows.schema == ANNOTATION_SCHEMA
    paths = [relpath_of(p, root) for p in rows["source_path"].to_pylist()]
    assert set(paths) == expected.all, "every input is accounted for"
    assert len(set(rows["id"].to_pylist())) == rows.num_rows, "row ids are unique"
    meta = json.loads((model_dir / "ferray.json").read_text())
    # The artifact's own name for itself, else its folder's name and its metadata's fingerprint.
    version = meta.get("version") or f"{model_dir.name}-{artifact.fingerprint(meta)[:12]}"
    assert set(rows["model_version"].to_pylist()) == {version}
    by_path: dict[str, list[dict[str, Any]]] = {}
    for path, row in zip(paths, rows.to_pylist()):
        by_path.setdefault(path, []).append(row)

    for path, reason in expected.bad.items():
        assert [r["status"] for r in by_path[path]] == [reason], path
        assert by_path[path][0]["error"]
    for path in expected.canvases:
        (face,) = by_path[path]
        assert face["status"] == "ok" and face["face_index"] == 0 and face["frame_index"] is None, path
        probs = np.array(face["probs"])
        assert probs.shape == (7,) and probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert face["label"] == probs.argmax() and face["label_name"] == LABELS[face["label"]]
        assert face["confidence"] == pytest.approx(probs.max())
        assert face["bbox"][2] >= 100  # the pasted face is 144–192 px, not a speck of background
    assert sorted(r["face_index"] for r in by_path[expected.two_faces]) == [0, 1]
    assert [r["status"] for r in by_path[expected.no_face]] == ["align:no_face"]
    for path, (fps, with_face, frames) in expected.videos.items():
        sampled = sorted(by_path[path], key=lambda r: r["frame_index"])
        step = round(fps / 2)  # --fps 2
        assert [r["frame_index"] for r in sampled] == list(range(0, frames, step)), path
        assert [r["timestamp_s"] for r in sampled] == pytest.approx([k * 0.5 for k in range(len(sampled))])
        assert [r["status"] for r in sampled] == ["ok" if r["frame_index"] < with_face else "align:no_face" for r in sampled]
        assert len({r["unit"] for r in sampled}) > 1, "the video was split into segments"

    # The stats agree with the rows, shard by shard and in total.
    stats = io.read_stats(out, storage)
    assert sum(s["rows"] for s in stats) == rows.num_rows
    statuses = rows["status"].to_pylist()
    totals: dict[str, int] = {}
    for s in stats:
        for key, count in s["by_status"].items():
            totals[key] = totals.get(key, 0) + count
    assert totals == {k: statuses.count(k) for k in set(statuses)}
    assert sum(s["extra"]["faces"] for s in stats) == statuses.count("ok")
    assert sum(s["extra"]["no_face"] for s in stats) == statuses.count("align:no_face")
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    mean = sum(s["extra"]["confidence_sum"] for s in stats) / ok.num_rows
    assert mean == pytest.approx(pc.mean(ok["confidence"]).as_py(), rel=1e-5)
    assert all(0 <= s["no_face_rate"] <= 1 for s in stats if s["no_face_rate"] is not None)

    # One summary row and one timeline per readable video.
    for path, (_, with_face, frames) in expected.videos.items():
        summary = io.read_parquet(io.join(out, "videos", f"{path}.parquet"), storage)
        assert summary.schema == VIDEO_SUMMARY_SCHEMA
        row = summary.to_pylist()[0]
        sampled = len(range(0, frames, round(expected.videos[path][0] / 2)))
        assert row["frames_sampled"] == sampled and row["status"] == "ok"
        assert row["share_no_face"] == pytest.approx(1 - row["frames_with_face"] / sampled)
        assert sum(row[f"share_{n}"] for n in LABELS) + row["share_no_face"] == pytest.approx(1.0)
        png = io.read_bytes(io.join(out, "timelines", f"{path}.png"), storage)
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3


def test_folder_every_input_accounted_for(folder_run: dict[str, Any], media_root: tuple[Path, Expected],
                                          model_dir: Path) -> None:
    root, expected = media_root
    summary = folder_run["summary"]
    assert summary.shards_written >= 3 and summary.shards_skipped == 0
    assert summary.rows == folder_run["rows"].num_rows
    check_run(folder_run["rows"], str(root), expected, model_dir, str(folder_run["out"]), StorageSettings())
    assert summary.extra["video_seconds"] == pytest.approx(3.0 + 2.0)
    assert summary.extra["inputs_video"] == 4 and summary.extra["inputs_other"] == 1


def test_reruns_are_incremental_and_resumable(folder_run: dict[str, Any], media_root: tuple[Path, Expected],
                                              model_dir: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(media_root[0], root)
    shutil.copytree(folder_run["out"], out)
    settings = settings_for()
    before = folder_run["rows"]

    # 1. Same SOURCE, same model: nothing is written, not even the run record.
    files = snapshot(out)
    again = annotate.run(settings, str(model_dir), str(root), str(out))
    assert again.shards_written == 0 and again.shards_skipped == folder_run["summary"].shards_written
    assert again.rows == before.num_rows and snapshot(out) == files

    # 2. One new file: only it is processed, in one new shard.
    (root / "photos/new").mkdir()
    shutil.copy(root / "photos/album/happy-3.bmp", root / "photos/new/happy-copy.bmp")
    added = annotate.run(settings, str(model_dir), str(root), str(out))
    assert added.shards_written == 1
    new = sorted(set(snapshot(out)) - set(files))
    stats = io.read_json(str(out / next(p for p in new if p.startswith("_stats/"))), StorageSettings())
    assert [u[0] for u in stats["units"]] == ["photos/new/happy-copy.bmp"] and stats["rows"] == 1
    rows = all_rows(str(out), StorageSettings())
    assert rows.num_rows == before.num_rows + 1

    # 3. A crash between writing a shard and marking it: the rerun redoes that shard alone, and
    #    neither loses nor duplicates a row; unmarked leftovers of the crash are removed.
    victim = sorted((out / "_markers").glob("*.json"))[0]
    victim.unlink()
    (out / "part-0123456789abcdef.parquet").write_bytes(b"half a file")
    resumed = annotate.run(settings, str(model_dir), str(root), str(out))
    assert resumed.shards_written == 1 and victim.exists()
    assert not (out / "part-0123456789abcdef.parquet").exists()
    after = all_rows(str(out), StorageSettings())
    assert sorted(after["id"].to_pylist()) == sorted(rows["id"].to_pylist())

    # 4. A file replaced in place (another size) is annotated again, its old rows dropped.
    shutil.copy(root / "photos/pair.png", root / "photos/new/happy-copy.bmp")
    replaced = annotate.run(settings, str(model_dir), str(root), str(out))
    assert replaced.shards_written == 1
    after = all_rows(str(out), StorageSettings())
    mine = [r for r in after.to_pylist() if r["source_path"].endswith("photos/new/happy-copy.bmp")]
    assert sorted(r["face_index"] for r in mine) == [0, 1] and after.num_rows == rows.num_rows + 1

    # 5. Another model version re-annotates everything and then supersedes the old shards.
    second = tmp_path / "model-v2"
    shutil.copytree(model_dir, second)
    meta = json.loads((second / "ferray.json").read_text())
    (second / "ferray.json").write_text(json.dumps({**meta, "version": "v2-test"}))
    redone = annotate.run(settings, str(second), str(root), str(out))
    assert redone.shards_written >= 3 and redone.shards_skipped == 0 and redone.extra["shards_superseded"] >= 4
    final = all_rows(str(out), StorageSettings())
    assert set(final["model_version"].to_pylist()) == {"v2-test"}
    assert sorted(final["id"].to_pylist()) == sorted(after["id"].to_pylist()), "ids are stable across models"
    summary = io.read_parquet(str(out / "videos/clips/talk.mp4.parquet"), StorageSettings())
    assert summary["model_version"].to_pylist() == ["v2-test"]
    keys = {json.loads(p.read_text())["run_key"] for p in (out / "_stats").glob("*.json")}
    assert len(keys) == 1 and len(list((out / "_markers").glob("*.json"))) == redone.shards_written


def test_s3_prefix(s3_bucket: str, folder_run: dict[str, Any], media_root: tuple[Path, Expected], model_dir: Path) -> None:
    root, expected = media_root
    storage = load_settings().storage.resolved()
    fs, _ = io.url_to_fs(s3_bucket, storage)
    source, out = f"{s3_bucket}/annotate/archive", f"{s3_bucket}/annotate/out"
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{source[5:]}/{path.relative_to(root).as_posix()}", path.read_bytes())
    # Split pools here (the default fuses without a GPU): the rows must not depend on the layout.
    summary = annotate.run(settings_for(pools="split"), str(model_dir), source, out)
    rows = all_rows(out, storage)
    check_run(rows, source, expected, model_dir, out, storage)
    assert summary.rows == rows.num_rows
    # The same files give the same rows, wherever SOURCE lives.
    local = folder_run["rows"]
    assert sorted(rows["id"].to_pylist()) == sorted(local["id"].to_pylist())
    assert dict(zip(rows["id"].to_pylist(), rows["label"].to_pylist())) == dict(
        zip(local["id"].to_pylist(), local["label"].to_pylist()))
    assert annotate.run(settings_for(pools="split"), str(model_dir), source, out).shards_written == 0


def test_classification_runs_in_the_detect_actors_unless_it_needs_its_own() -> None:
    """`pools: auto` on a 16-CPU, 2-GPU cluster: LiteRT on CPUs in every detect actor; its own actors for a
    GPU share, or for the Keras runtime (TensorFlow started once per `label_every` CPUs)."""
    def plan(**knobs: Any) -> Actors:
        return plan_actors(load_settings(annotate=knobs).annotate, 16, 2.0)

    assert plan() == Actors("fused", 16, 0, 1.0)
    assert plan(runtime="keras") == Actors("split", 16, 2, 0.0)
    assert plan(num_gpus=1) == Actors("split", 14, 2, 1.0)
    assert plan(pools="split") == Actors("split", 16, 2, 0.0)


def _finder(tmp_path: Path, faces: dict[str, Any] | None = None, **knobs: Any) -> FaceFinder:
    settings = load_settings(annotate=knobs, faces=faces or {})
    model = ModelRef("unused", "v", 48, "gray")
    faces = face_settings(settings.faces, model)
    return FaceFinder(Job(str(tmp_path), "", StorageSettings(), faces, settings.annotate, model,
                          run_key(model, faces, settings.annotate)))


def test_grouped_alignment_gives_the_rows_of_one_at_a_time(media_root: tuple[Path, Expected]) -> None:
    """Frames aligned in groups (detection over the group before landmarks; `annotate.align_group`) give
    the same draft rows, in the same order, as one frame at a time: over images, video frames, bad
    files and faceless pictures, with groups that straddle units."""
    from ferray.executor.ledger import Ledger

    root, expected = media_root
    drafts = {}
    for group in (1, 5):
        finder = _finder(root, align_group=group, **KNOBS)
        units = plan_units(finder.tree, finder.tree.files(), Ledger([], finder.job.run_key), finder.settings)
        drafts[group] = finder.find(units)[0]
    assert drafts[5].equals(drafts[1])
    statuses = set(drafts[1]["status"].to_pylist())
    assert {"ok", "align:no_face"} <= statuses and len(statuses) > 3, statuses
    assert drafts[1]["frame_index"].null_count < drafts[1].num_rows, "video frames are among the rows"


def test_flip_tta_override_reaches_the_labeller_and_the_run_key(model_dir: Path, tmp_path: Path) -> None:
    """`annotate.flip_tta` classifies with or without the mirrored pass whatever the model says; a run
    key changes only when the setting differs from the model's own choice (reruns redo only then)."""
    from ferray.model import artifact

    face = load_face(next(p for p in SAMPLES if p.name == "Training_21562334.jpg"))
    picture = np.full((300, 300), 128, np.uint8)
    picture[60:252, 60:252] = cv2.resize(face, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    drafts = pa.Table.from_pylist(_finder(tmp_path).aligned_rows(picture, {}, "x", None, None),
                                  schema=DRAFT_SCHEMA)
    assert drafts["status"].to_pylist() == ["ok"]
    chip = np.frombuffer(drafts["chip"][0].as_py(), np.uint8).reshape(1, 48, 48, 1).astype(np.float32)
    loaded = artifact.load(str(model_dir), StorageSettings())
    ref = resolve_model(str(model_dir), StorageSettings())
    keys = set()
    for flip in (None, ref.flip_tta, not ref.flip_tta):
        settings = load_settings(annotate={"flip_tta": flip})
        faces = face_settings(settings.faces, ref)
        job = Job(str(tmp_path), "", StorageSettings(), faces, settings.annotate, ref,
                           run_key(ref, faces, settings.annotate))
        keys.add(job.run_key)
        probs = Labeller(job)(drafts)["probs"].to_pylist()[0]
        assert np.allclose(probs, loaded.predict(chip, flip_tta=flip)[0], atol=1e-5)
    assert len(keys) == 2
    assert not np.allclose(loaded.predict(chip, flip_tta=True), loaded.predict(chip, flip_tta=False), atol=1e-4)


@pytest.mark.parametrize("policy", ["auto", "faces"])
def test_upsampling_is_spent_on_small_images_only(policy: str, tmp_path: Path) -> None:
    """`annotate.upsample=auto` upsamples (faces.upsample=1) only an image without a face found at 0
    whose shorter side is under `upsample_below`: a bare 48 px FER face is found, the same face
    1.5× larger (72 px, under HOG's 80 px window) on a 320×240 picture is not; `faces` finds both."""
    face = load_face(next(p for p in SAMPLES if p.name == "Training_21562334.jpg"))
    big = cv2.resize(face, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC)
    picture = np.full((240, 320), 128, np.uint8)
    picture[20 : 20 + big.shape[0], 20 : 20 + big.shape[1]] = big
    finder = _finder(tmp_path, {"detector": "hog"}, upsample=policy)
    found = [[row["status"] for row in finder.aligned_rows(image, {}, "x", None, None)] for image in (face, picture)]
    assert found == ([["ok"], ["align:no_face"]] if policy == "auto" else [["ok"], ["ok"]])


def test_large_photos_are_detected_at_a_capped_size(tmp_path: Path) -> None:
    """A 4000×3000 photo is detected at 1920 px (`annotate.detect_max_side`): its 384 px face is found, with
    the box in the photo's own pixels; a 144 px face (69 px at 1920) is found only at full size. The cap is
    the detectors' shared path (faces.detect_faces); YuNet, whose box on so large a face is HOG's width, shows
    it (BlazeFace's box there is 59% of the square, under the bound below)."""
    face = load_face(next(p for p in SAMPLES if p.name == "Training_21562334.jpg"))
    rows = {}
    for scale, cap in ((8, 1920), (3, 1920), (3, None)):
        big = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        photo = np.full((3000, 4000), 128, np.uint8)
        photo[1000 : 1000 + big.shape[0], 2500 : 2500 + big.shape[1]] = big
        rows[(scale, cap)] = _finder(tmp_path, {"detector": "yunet"}, detect_max_side=cap).aligned_rows(
            photo, {}, "x", None, None)
    found = rows[(8, 1920)]
    assert [r["status"] for r in found] == ["ok"]
    x, y, w, h = found[0]["bbox"]
    # HOG's box covers the inner face: inside the pasted 384 px square, most of its width.
    assert 2500 <= x and x + w <= 2500 + 384 + 8 and 1000 <= y and y + h <= 1000 + 384 + 8 and w > 384 * 0.6, found[0]["bbox"]
    assert len(found[0]["chip"]) == 48 * 48
    assert [r["status"] for r in rows[(3, 1920)]] == ["align:no_face"]
    assert [r["status"] for r in rows[(3, None)]] == ["ok"]


class Recording:
    """The real detector, noting the size of every image it is given."""

    def __init__(self, detector: Any) -> None:
        self.detector, self.shapes = detector, []

    def __call__(self, image: np.ndarray, upsample: int) -> Any:
        self.shapes.append(image.shape[:2])
        return self.detector(image, upsample)

    def reach(self, upsample: int) -> float | None:
        return self.detector.reach(upsample)


def test_a_minimum_face_width_detects_on_a_smaller_copy(tmp_path: Path) -> None:
    """faces.min_face_px 192 on a 1280×720 frame: detection sees a 533×300 copy (HOG's 80 px reach / 192),
    finds the 288 px face with its box in the frame's pixels and leaves out the 144 px one, which the
    full frame (min_face_px 0) finds too. A faceless 150 px picture is not retried upsampled: at 192
    px the first pass already looked for every face wanted."""
    face = load_face(next(p for p in SAMPLES if p.name == "Training_21562334.jpg"))
    frame = np.full((720, 1280), 128, np.uint8)
    frame[100:388, 200:488] = cv2.resize(face, None, fx=6, fy=6, interpolation=cv2.INTER_CUBIC)
    frame[300:444, 900:1044] = cv2.resize(face, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    blank = np.full((150, 150), 90, np.uint8)
    found, shapes = {}, {}
    for min_face in (192, 0):
        finder = _finder(tmp_path, faces={"min_face_px": min_face, "detector": "hog"})
        finder.detector = recording = Recording(finder.detector)
        found[min_face] = finder.aligned_rows(frame, {}, "x", None, None)
        assert [r["status"] for r in finder.aligned_rows(blank, {}, "y", None, None)] == ["align:no_face"]
        shapes[min_face] = recording.shapes
    assert shapes[192] == [(300, 533), (62, 62)]
    assert shapes[0] == [(720, 1280), (150, 150), (150, 150)]  # the blank one retried, upsampled
    assert [r["status"] for r in found[192]] == ["ok"]
    x, y, w, h = found[192][0]["bbox"]
    assert 200 <= x and x + w <= 488 + 8 and 100 <= y and y + h <= 388 + 8 and w > 288 * 0.6, found[192][0]["bbox"]
    assert sorted(r["bbox"][2] > 150 for r in found[0]) == [False, True]  # HOG's boxes: ~180 and ~105 px


def test_cli_on_a_zip_with_split_pools_and_copied_videos(
        folder_run: dict[str, Any], media_root: tuple[Path, Expected], model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`ferray annotate` on a zip, detection and classification in separate actor pools (named,
    though `auto` splits too) and videos copied out of the archive; settings from env and flags."""
    root, expected = media_root
    archive = zip_folder(root, tmp_path / "archive.zip")
    out = tmp_path / "out"
    for key, value in {"POOLS": "split", "VIDEO_IO": "copy", "SHARD_FRAMES": "8"}.items():
        monkeypatch.setenv(f"FERRAY_ANNOTATE__{key}", value)
    monkeypatch.setenv("FERRAY_RAY__PROGRESS_BARS", "false")
    code = main(["annotate", str(model_dir), str(archive), str(out), "--fps", "2", "--segment-seconds", "1",
                 "--log-level", "WARNING"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"ferray annotate: {archive} -> {out}" in printed and "video:unreadable 1" in printed
    rows = all_rows(str(out), StorageSettings())
    check_run(rows, str(archive), expected, model_dir, str(out), StorageSettings())
    local = folder_run["rows"]
    assert sorted(zip(rows["id"].to_pylist(), rows["status"].to_pylist())) == sorted(
        zip(local["id"].to_pylist(), local["status"].to_pylist()))
    record = io.read_json(str(out / "_ferray/annotate.json"), StorageSettings())
    assert record["settings"]["annotate"]["pools"] == "split" and record["summary"]["rows"] == rows.num_rows


def test_out_inside_source_is_not_an_input(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/a.jpg").write_bytes(b"x")
    (tmp_path / "labels/timelines").mkdir(parents=True)
    (tmp_path / "labels/timelines/v.mp4.png").write_bytes(b"x")
    files = plan.inputs(io.Tree(str(tmp_path), StorageSettings()), str(tmp_path / "labels"), StorageSettings())
    assert [f.relpath for f in files] == ["photos/a.jpg"]


def test_missing_model_is_a_one_line_failure(tmp_path: Path, media_root: tuple[Path, Expected],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["annotate", str(tmp_path / "no-model"), str(media_root[0]), str(tmp_path / "out")])
    assert code == EXIT_CANNOT_RUN
    assert "no model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
