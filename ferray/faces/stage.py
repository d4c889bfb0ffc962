"""`ferray align`: the Dlib face stage over ingested shards, plus a contact sheet to eyeball it."""

from __future__ import annotations

import functools
import logging
import random

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ferray import executor
from ferray.config import FacesSettings, Settings, StorageSettings
from ferray.data import io
from ferray.data.schema import ALIGNED_SCHEMA, FACE, FACE_SOURCE, FACES_FOUND
from ferray.executor import Resources, RowStage, Summary, upstream_units
from ferray.faces.align import AlignStage

log = logging.getLogger(__name__)
CONTACT_SHEET = "contact_sheet.png"


class Align(RowStage):
    """The align stage: Dlib models loaded once per actor (remote model files fetched there)."""

    name = "align"
    version = 1
    schema = ALIGNED_SCHEMA

    def __init__(self, faces: FacesSettings, storage: StorageSettings) -> None:
        super().__init__(storage)
        self.faces = faces
        self.resources = Resources(num_cpus=AlignStage.NUM_CPUS, batch_size=AlignStage.BATCH_SIZE)
        self.stage: AlignStage | None = None

    def setup(self) -> None:
        self.stage = AlignStage(self.faces, fetch=functools.partial(io.fetch_cached, storage=self.storage))

    def batch(self, table: pa.Table) -> pa.Table:
        assert self.stage is not None
        return self.stage.table(table)

    def extra_stats(self, table: pa.Table) -> dict[str, int]:
        return align_stats(table)


def align_stats(table: pa.Table) -> dict[str, int]:
    """Detection counts for `_stats/`: faces by source and faces found in all."""
    sources = table[FACE_SOURCE].to_pylist()
    return {
        "detected": sources.count("detected"),
        "full_frame": sources.count("full_frame"),
        "faces_found": int(pc.sum(table[FACES_FOUND]).as_py() or 0),
    }


def contact_sheet(out: str, storage: StorageSettings, count: int = 64, seed: int = 0) -> np.ndarray | None:
    """A grid of randomly sampled aligned faces (grey or RGB), or None when there are none."""
    faces: list[bytes] = []
    for uri in io.completed_shards(out, storage):
        faces += [f for f in io.read_parquet(uri, storage, columns=[FACE])[FACE].to_pylist() if f]
    if not faces:
        return None
    chosen = random.Random(seed).sample(faces, min(count, len(faces)))
    tiles = [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) for data in chosen]
    side = int(np.ceil(np.sqrt(len(tiles))))
    height, width = tiles[0].shape[:2]
    sheet = np.full((side * (height + 2), side * (width + 2), 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, side)
        sheet[row * (height + 2) : row * (height + 2) + height, col * (width + 2) : col * (width + 2) + width] = tile
    return sheet


def run(settings: Settings, source: str, out: str) -> Summary:
    """Align every ok row of the ingested shards under SOURCE into OUT."""
    storage = settings.storage
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    faces = settings.faces.for_command("align")
    units = upstream_units(source, storage, {"stage": "align", **faces.model_dump(mode="json")})
    summary = executor.run(Align(faces, storage), units, source, out, storage, settings.ray)
    # An empty input (an empty SOURCE upstream) has no faces to show, and OUT no shards to list.
    sheet = contact_sheet(out, storage) if summary.by_status.get("ok") else None
    if sheet is not None:
        ok, png = cv2.imencode(".png", sheet)
        if ok:
            io.write_bytes_atomic(io.join(out, CONTACT_SHEET), png.tobytes(), storage)
    ok_rows = summary.by_status.get("ok", 0)
    detected = summary.extra.get("detected", 0)
    log.info("align: %d ok rows, %d detected (%.1f%%), %d full frame", ok_rows, detected,
             100.0 * detected / max(ok_rows, 1), summary.extra.get("full_frame", 0))
    executor.write_meta(out, summary, settings, storage)
    return summary
