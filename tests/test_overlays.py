"""`ferray annotate --overlays` on real media (tests/test_video.py's archive of FER-2013 faces, videos and
bad files): the pictures exist, decode, have the source's size, show each row's box where the row says,
change no row, and are written through ferray.data.io to S3 as well."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from ferray import annotate
from ferray.annotate import overlays
from ferray.annotate.job import Job, face_settings, resolve_model, run_key
from ferray.executor.ledger import read as read_ledger
from ferray.config import StorageSettings, load_settings
from ferray.data import io
from ferray.evaluate.report import CLASS_COLORS
from test_annotate import all_rows, relpath_of, settings_for, snapshot
from test_video import Expected, build_media

STORAGE = StorageSettings()


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[k : k + 2], 16) for k in (1, 3, 5)], np.int16)


def decoded(data: bytes) -> Image.Image:
    import io as stdio

    image = Image.open(stdio.BytesIO(data))
    image.load()
    return image


def check_box_drawn(picture: np.ndarray, source: np.ndarray, row: dict[str, Any]) -> None:
    """The row's box is drawn in its class colour along its left and right edges (below the caption),
    a few pixels outside those edges and inside the box the picture is the source's."""
    x, y, w, h = row["bbox"]
    colour = rgb(CLASS_COLORS[row["label"]])
    band = slice(y + h // 3, y + 2 * h // 3)
    width = overlays.line_width((source.shape[1], source.shape[0]))

    def off(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1).mean())

    for column, outside in ((x + width // 2, x - 4), (x + w - 1 - width // 2, x + w + 3)):
        assert off(picture[band, column], colour) < 40, (row["source_path"], column)
        if 0 <= outside < source.shape[1]:
            assert off(picture[band, outside], source[band, outside]) < 25, (row["source_path"], outside)
    inside = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))
    assert off(picture[inside], source[inside]) < 10


def test_draw_boxes_puts_each_box_and_caption_where_asked() -> None:
    """Pure drawing, exact pixels: the outline on the box's edges in its class colour, the caption above."""
    image = Image.new("L", (300, 200), 128)
    box = overlays.Box((40, 60, 100, 80), 3, 0.87)
    out = np.asarray(overlays.draw_boxes(image, [box]))
    assert out.shape == (200, 300, 3)
    happy = rgb(CLASS_COLORS[3])
    assert (out[100, 40] == happy).all() and (out[100, 139] == happy).all() and (out[139, 90] == happy).all()
    assert (out[100, 90] == 128).all(), "inside the box is untouched"
    assert (out[59, 41] == happy).all(), "the caption's strip sits on the box's top edge"
    assert box.caption == "happy 87%" and overlays.Box((0, 0, 9, 9), 5, 0.5, 2).caption == "#2 surprise 50%"
    # A box at the very top keeps its caption inside the picture.
    top = np.asarray(overlays.draw_boxes(image, [overlays.Box((10, 0, 60, 60), 0, 0.5)]))
    assert (top[5, 12] == rgb(CLASS_COLORS[0])).all()
    sheet = overlays.sheet([(image, "a"), (image, "b\nc"), (image, "d")], 2, 150)
    assert sheet.size == (2 * 154 + 4, 2 * (100 + 4 + 32 + 4) + 4)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("overlay-media") / "archive"
    return root, build_media(root, seed=3)


@pytest.fixture(scope="module")
def runs(ray_session: None, model_dir: Path, archive: tuple[Path, Expected],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The archive annotated without overlays, then again with them into the same OUT."""
    root, _ = archive
    out = tmp_path_factory.mktemp("overlay-out") / "out"
    plain = annotate.run(settings_for(), str(model_dir), str(root), str(out))
    rows = all_rows(str(out), STORAGE)
    shards = snapshot(out)
    pictures = annotate.run(settings_for(overlays=True), str(model_dir), str(root), str(out))
    return {"out": out, "plain": plain, "rows": rows, "shards": shards, "pictures": pictures}


def test_overlays_change_no_row_and_are_drawn_once(runs: dict[str, Any], model_dir: Path,
                                                    archive: tuple[Path, Expected]) -> None:
    """Turning overlays on keeps the run key: nothing is detected or classified again, every row and
    shard file stays byte for byte, and only the missing pictures are drawn; a third run draws none."""
    out, pictures = runs["out"], runs["pictures"]
    assert pictures.shards_written == 0 and pictures.shards_skipped == runs["plain"].shards_written
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("_overlays/")} == runs["shards"]
    assert all_rows(str(out), STORAGE).equals(runs["rows"])
    _, expected = archive
    drawable = set(expected.canvases) | {expected.two_faces, expected.no_face} | set(expected.videos)
    assert pictures.extra["overlays_written"] == len(drawable) and pictures.extra["overlays_failed"] == 0
    again = annotate.run(settings_for(overlays=True), str(model_dir), str(archive[0]), str(out))
    assert again.extra["overlays_written"] == 0 and snapshot(out) == after


def test_each_image_shows_its_rows_boxes(runs: dict[str, Any], archive: tuple[Path, Expected]) -> None:
    root, expected = archive
    out, rows = runs["out"], runs["rows"]
    ok = rows.filter(pc.equal(rows["status"], "ok")).to_pylist()
    images = set(expected.canvases) | {expected.two_faces, expected.no_face}
    for relpath in images:
        source = Image.open(root / relpath).convert("RGB")
        picture = Image.open(out / "_overlays" / f"{relpath}.jpg")
        assert picture.format == "JPEG" and picture.size == source.size, relpath
        mine = [r for r in ok if relpath_of(r["source_path"], str(root)) == relpath]
        assert len(mine) == (0 if relpath == expected.no_face else 2 if relpath == expected.two_faces else 1)
        for row in mine:
            check_box_drawn(np.asarray(picture.convert("RGB")), np.asarray(source), row)
    # Bad files have nothing to draw: no picture, no failure.
    assert not any((out / "_overlays" / f"{relpath}.jpg").exists() for relpath in expected.bad)


def test_each_video_is_a_sheet_of_its_sampled_frames(runs: dict[str, Any], archive: tuple[Path, Expected]) -> None:
    _, expected = archive
    out = runs["out"]
    for relpath, (fps, _, frames) in expected.videos.items():
        sheet = Image.open(out / "_overlays" / f"{relpath}.png")
        sampled = len(range(0, frames, round(fps / 2)))
        tiles = min(overlays.SHEET_FRAMES, sampled)
        columns = min(4, tiles)
        assert sheet.format == "PNG" and sheet.width == columns * (overlays.TILE_WIDTH + 4) + 4, relpath
        # 320×240 frames at 320 px wide, a one-line caption strip beneath each.
        assert sheet.height == -(-tiles // columns) * (240 + 20 + 4) + 4, relpath
    faces = Image.open(out / "_overlays" / overlays.FACES_SHEET)
    assert faces.format == "PNG" and faces.width == 8 * (overlays.FACE_SIDE + 4) + 4


def test_a_picture_that_cannot_be_drawn_is_counted_not_fatal(runs: dict[str, Any], model_dir: Path,
                                                               archive: tuple[Path, Expected], tmp_path: Path) -> None:
    """An input removed after its rows were written: its overlay is counted as failed, the others drawn."""
    root, expected = archive
    copy, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(root, copy)
    shutil.copytree(runs["out"], out)
    shutil.rmtree(out / "_overlays")
    settings = settings_for(overlays=True)
    storage = settings.storage.resolved()
    ref = resolve_model(str(model_dir), storage)
    faces = face_settings(settings.faces, ref)
    job = Job(str(copy), str(out), storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    files = io.Tree(str(copy), storage).files()
    gone = next(iter(expected.canvases))
    (copy / gone).unlink()
    counts = overlays.write_overlays(job, files, read_ledger(str(out), storage, "annotate"), frozenset())
    drawable = set(expected.canvases) | {expected.two_faces, expected.no_face} | set(expected.videos)
    assert counts == {"overlays_written": len(drawable) - 1, "overlays_failed": 1}
    assert not (out / "_overlays" / f"{gone}.jpg").exists() and (out / "_overlays" / "faces.png").exists()


def test_overlays_on_s3(s3_bucket: str, runs: dict[str, Any], model_dir: Path, archive: tuple[Path, Expected]) -> None:
    """SOURCE and OUT on S3: the pictures are written through ferray.data.io, the same as on disk."""
    root, expected = archive
    storage = load_settings().storage.resolved()
    fs, _ = io.url_to_fs(s3_bucket, storage)
    source, out = f"{s3_bucket}/overlays/archive", f"{s3_bucket}/overlays/out"
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{source[5:]}/{path.relative_to(root).as_posix()}", path.read_bytes())
    summary = annotate.run(settings_for(overlays=True), str(model_dir), source, out)
    assert summary.extra["overlays_failed"] == 0
    assert summary.extra["overlays_written"] == runs["pictures"].extra["overlays_written"]
    def boxes(table: Any) -> dict[str, tuple[Any, Any]]:
        return {r["id"]: (r["label"], r["bbox"]) for r in table.select(["id", "label", "bbox"]).to_pylist()}

    assert boxes(all_rows(out, storage)) == boxes(runs["rows"])
    for relpath in (expected.two_faces, *expected.videos):
        suffix = ".jpg" if relpath == expected.two_faces else ".png"
        remote = decoded(io.read_bytes(io.join(out, "_overlays", relpath + suffix), storage))
        local = Image.open(runs["out"] / "_overlays" / f"{relpath}{suffix}")
        assert remote.size == local.size, relpath
    assert decoded(io.read_bytes(io.join(out, "_overlays", overlays.FACES_SHEET), storage)).format == "PNG"
