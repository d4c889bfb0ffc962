"""Pictures of what annotate found (`--overlays`): each image with its boxes, a sheet per video, the run's faces.

Drawn on the driver after every shard is written and marked and every video summarised, from the rows
as written and the source pixels read again. An overlay is therefore only a picture of the rows: it
never changes, adds or drops one, and an input whose overlay cannot be drawn (it vanished, its
bytes changed) is counted and logged, not fatal.

Boxes and captions are drawn with PIL's ImageDraw and its bundled scalable font (no extra
dependency). A video becomes a contact sheet of its sampled frames rather than an MP4: the
opencv-python-headless wheels can only write MPEG-4 Part 2 (`mp4v`), which browsers do not play,
while a PNG opens in any viewer, browser and Markdown page.
"""

from __future__ import annotations

import functools
import io as stdio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from ferray.annotate import video
from ferray.annotate.job import Job
from ferray.annotate.ledger import unit_relpath
from ferray.executor.ledger import ShardRecord, read_rows
from ferray.annotate.media import MediaError, media_type, output_path
from ferray.data import io
from ferray.data.images import DecodeError, open_checked, to_array
from ferray.data.schema import LABELS, MEDIA_IMAGE, STATUS_OK
from ferray.evaluate.report import CLASS_COLORS
from ferray.faces.align import NO_FACE

log = logging.getLogger(__name__)

OVERLAYS = "_overlays"  # OUT/_overlays/<image>.jpg, OUT/_overlays/<video>.png, OUT/_overlays/faces.png
FACES_SHEET = "faces.png"
SHEET_FRAMES = 16  # tiles of a video's sheet, spread evenly over its sampled frames
SHEET_FACES = 64  # faces on the run's sheet
TILE_WIDTH = 320
FACE_SIDE = 150
COLUMNS = ("unit", "media_type", "frame_index", "timestamp_s", "face_index", "bbox", "label", "confidence",
           "status", "track_id")
# What can go wrong drawing one input after its rows were written: it was removed or replaced since.
FAILURES = (MediaError, DecodeError, cv2.error, *io.READ_ERRORS)


@dataclass(frozen=True)
class Box:
    """One face row as drawn: its box in source pixels, label, confidence and track (video faces)."""

    bbox: tuple[int, int, int, int]
    label: int
    confidence: float
    track_id: int | None = None

    @property
    def caption(self) -> str:
        track = f"#{self.track_id} " if self.track_id is not None else ""
        return f"{track}{LABELS[self.label]} {self.confidence:.0%}"


def image_overlay_path(relpath: str) -> str:
    return output_path(relpath, ".jpg")


def video_overlay_path(relpath: str) -> str:
    return output_path(relpath, ".png")


# --------------------------------------------------------------------------- drawing (pure)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def line_width(size: tuple[int, int]) -> int:
    """Box outline in px: visible on a thumbnail, not heavy on a 4K frame."""
    return max(2, round(max(size) / 250))


def draw_boxes(image: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """An RGB copy of `image` with each face's box (in its class colour) and a caption above it (inside
    the box when there is no room above)."""
    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    width = line_width(out.size)
    font = _font(int(np.clip(max(out.size) / 28, 11, 48)))
    for box in boxes:
        x, y, w, h = box.bbox
        colour = CLASS_COLORS[box.label]
        pen.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=width)
        left, top, right, bottom = pen.textbbox((0, 0), box.caption, font=font)
        text_w, text_h = right - left + 6, bottom - top + 4
        ty = y - text_h if y - text_h >= 0 else y + width
        pen.rectangle((x, ty, x + text_w, ty + text_h), fill=colour)
        pen.text((x + 3 - left, ty + 2 - top), box.caption, fill="white", font=font)
    return out


def no_face(image: Image.Image) -> Image.Image:
    """An RGB copy with "no face found" in a grey strip at its top left: the picture says it was looked at."""
    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    font = _font(int(np.clip(max(out.size) / 28, 11, 48)))
    left, top, right, bottom = pen.textbbox((0, 0), "no face found", font=font)
    pen.rectangle((0, 0, right - left + 6, bottom - top + 4), fill="#7f7f7f")
    pen.text((3 - left, 2 - top), "no face found", fill="white", font=font)
    return out


def sheet(tiles: Sequence[tuple[Image.Image, str]], columns: int, tile_width: int) -> Image.Image:
    """Tiles scaled to `tile_width` on a grid, each with its caption in a strip beneath."""
    font = _font(13)
    heights = [round(tile.height * tile_width / tile.width) for tile, _ in tiles]
    strip = 4 + 16 * max((caption.count("\n") + 1 for _, caption in tiles), default=1)
    cell_h = max(heights, default=1) + strip
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    gap = 4
    out = Image.new("RGB", (columns * (tile_width + gap) + gap, rows * (cell_h + gap) + gap), "white")
    pen = ImageDraw.Draw(out)
    for k, ((tile, caption), height) in enumerate(zip(tiles, heights)):
        x, y = gap + (k % columns) * (tile_width + gap), gap + (k // columns) * (cell_h + gap)
        out.paste(tile.convert("RGB").resize((tile_width, height), Image.Resampling.LANCZOS), (x, y))
        pen.multiline_text((x + 2, y + height + 3), caption, fill="black", font=font, spacing=3)
    return out


def face_crop(image: Image.Image, bbox: Sequence[int], side: int = FACE_SIDE) -> Image.Image:
    """The face with a margin of a fifth of its width, square, `side` px."""
    x, y, w, h = bbox
    margin = round(0.2 * max(w, h))
    cx, cy, half = x + w / 2, y + h / 2, max(w, h) / 2 + margin
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    return image.crop(box).resize((side, side), Image.Resampling.LANCZOS)  # PIL pads outside with black


def _encode(image: Image.Image, kind: str) -> bytes:
    # JPEG without chroma subsampling: a 2 px coloured outline keeps its colour.
    buffer = stdio.BytesIO()
    image.save(buffer, format=kind, **({"quality": 92, "subsampling": 0} if kind == "JPEG" else {}))
    return buffer.getvalue()


# --------------------------------------------------------------------------- one input


@dataclass
class Drawn:
    """What one input gave: its overlay's URI and the faces for the run's sheet (crop, caption)."""

    uri: str
    faces: list[tuple[Image.Image, str]]


def _boxes(rows: list[dict[str, Any]]) -> list[Box]:
    return [Box(tuple(r["bbox"]), r["label"], r["confidence"], r["track_id"])  # type: ignore[arg-type]
            for r in sorted(rows, key=lambda r: r["face_index"]) if r["status"] == STATUS_OK]


def draw_image(job: Job, tree: io.Tree, file: io.TreeFile, rows: list[dict[str, Any]]) -> Drawn:
    """OUT/_overlays/<image>.jpg: the image as detection saw it (EXIF turned), same size, with its boxes."""
    data = tree.read(file.member)
    picture = Image.fromarray(to_array(open_checked(data, job.faces.limits), "rgb"))
    boxes = _boxes(rows)
    drawn = draw_boxes(picture, boxes) if boxes else no_face(picture)
    uri = io.join(job.out, OVERLAYS, image_overlay_path(file.relpath or file.member))
    io.write_bytes_atomic(uri, _encode(drawn, "JPEG"), job.storage)
    name = (file.relpath or file.member).rsplit("/", 1)[-1]
    return Drawn(uri, [(face_crop(picture, b.bbox), f"{b.caption}\n{name}") for b in boxes])


def _read_frames(job: Job, tree: io.Tree, member: str, wanted: list[int]) -> dict[int, Image.Image]:
    """The frames at `wanted` indices (ascending), seeking only across gaps longer than a second."""
    frames: dict[int, Image.Image] = {}
    with video.capture(tree, member, job.settings) as cap:
        fps = video.probe(cap).fps
        position = 0
        for target in wanted:
            if target - position > fps:
                cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                position = int(round(cap.get(cv2.CAP_PROP_POS_FRAMES)))
            while position < target and cap.grab():
                position += 1
            ok, frame = cap.read()
            if not ok or frame is None or position != target:
                raise MediaError("video", "unreadable", f"frame {target} could not be read again")
            position += 1
            frames[target] = Image.fromarray(video.to_pixels(frame, "rgb"))
    return frames


def draw_video(job: Job, tree: io.Tree, file: io.TreeFile, rows: list[dict[str, Any]]) -> Drawn:
    """OUT/_overlays/<video>.png: up to SHEET_FRAMES sampled frames with their boxes and times; each
    track's most confident face per label for the run's sheet."""
    by_frame: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["frame_index"] is not None and row["status"] in (STATUS_OK, NO_FACE):
            by_frame.setdefault(row["frame_index"], []).append(row)
    sampled = sorted(by_frame)
    picks = sorted({sampled[k] for k in np.linspace(0, len(sampled) - 1, min(SHEET_FRAMES, len(sampled))).round().astype(int)}) \
        if sampled else []
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row["status"] == STATUS_OK and row["frame_index"] is not None:
            # Each track's best face per label: a track that changes expression (or that the linker
            # carried across a cut to someone else) shows each of its faces.
            key = (row["track_id"], row["label"]) if row["track_id"] is not None else (row["frame_index"], row["face_index"])
            if key not in best or row["confidence"] > best[key]["confidence"]:
                best[key] = row
    frames = _read_frames(job, tree, file.member, sorted(set(picks) | {r["frame_index"] for r in best.values()}))
    tiles = []
    for index in picks:
        found = _boxes(by_frame[index])
        caption = f"{by_frame[index][0]['timestamp_s']:.1f} s" + ("" if found else "  (no face)")
        tiles.append((draw_boxes(frames[index], found), caption))
    uri = io.join(job.out, OVERLAYS, video_overlay_path(file.relpath or file.member))
    io.write_bytes_atomic(uri, _encode(sheet(tiles, 4, TILE_WIDTH), "PNG"), job.storage)
    name = (file.relpath or file.member).rsplit("/", 1)[-1]
    faces = [(face_crop(frames[r["frame_index"]], r["bbox"]),
              f"{Box(tuple(r['bbox']), r['label'], r['confidence'], r['track_id']).caption}\n{name} {r['timestamp_s']:.1f} s")
             for r in sorted(best.values(), key=lambda r: (r["timestamp_s"], r["face_index"]))]
    return Drawn(uri, faces)


# --------------------------------------------------------------------------- the run's overlays


def _existing(job: Job) -> set[str]:
    """Overlay files already in OUT/_overlays/ (one listing, not a request per input)."""
    root = io.join(job.out, OVERLAYS)
    if not io.exists(root, job.storage):
        return set()
    fs, path = io.url_to_fs(root, job.storage)
    return {full[len(path):].lstrip("/") for full in fs.find(path)}


def write_overlays(job: Job, files: list[io.TreeFile], records: list[ShardRecord], fresh: frozenset[str]) -> dict[str, Any]:
    """Draw every finished image and video whose overlay is missing or whose rows were written afresh by this
    run, then OUT/_overlays/faces.png from the faces drawn; counts and where the pictures are."""
    existing = _existing(job)
    shards: dict[str, set[str]] = {}
    for record in records:
        for key in record.units:
            shards.setdefault(key[0], set()).add(record.shard)
    todo = []
    for file in files:
        kind = media_type(file.relpath or "")
        if file.relpath is None or kind is None or file.relpath not in shards:
            continue
        target = image_overlay_path(file.relpath) if kind == MEDIA_IMAGE else video_overlay_path(file.relpath)
        if file.relpath in fresh or target not in existing:
            todo.append((file, kind))
    if not todo:
        return {"overlays_written": 0, "overlays_failed": 0}
    needed = sorted({shard for file, _ in todo for shard in shards[file.relpath]})  # type: ignore[index]
    threads = job.settings.probe_threads
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tables = list(pool.map(lambda s: read_rows(job.out, job.storage, s, list(COLUMNS)), needed))
    rows = pa.concat_tables(tables)
    rows = rows.filter(pc.is_in(rows["status"], pa.array([STATUS_OK, NO_FACE])))
    by_input: dict[str, list[dict[str, Any]]] = {}
    for row in rows.to_pylist():
        by_input.setdefault(unit_relpath(row["unit"], row["media_type"]), []).append(row)

    tree = io.Tree(job.source, job.storage)

    def one(item: tuple[io.TreeFile, str]) -> Drawn | None:
        file, kind = item
        mine = by_input.get(file.relpath or "", [])
        if not mine:  # nothing decodable came of it (a bad file): no picture to draw
            return None
        try:
            return (draw_image if kind == MEDIA_IMAGE else draw_video)(job, tree, file, mine)
        except FAILURES as error:
            log.warning("annotate: no overlay for %s: %s", file.relpath, error)
            return Drawn("", [])

    try:
        # Archive handles are not shared across threads: one reader at a time for a zip or tar SOURCE.
        with ThreadPoolExecutor(max_workers=threads if tree.kind == "dir" else 1) as pool:
            drawn = [d for d in pool.map(one, todo) if d is not None]
    finally:
        tree.close()
    written = [d for d in drawn if d.uri]
    faces = [face for d in written for face in d.faces][:SHEET_FACES]
    counts: dict[str, Any] = {"overlays_written": len(written), "overlays_failed": len(drawn) - len(written)}
    if faces:
        uri = io.join(job.out, OVERLAYS, FACES_SHEET)
        io.write_bytes_atomic(uri, _encode(sheet(faces, 8, FACE_SIDE), "PNG"), job.storage)
    log.info("annotate: %d overlays in %s (%d failed)", len(written), io.join(job.out, OVERLAYS), counts["overlays_failed"])
    return counts
