"""FER-2013: the image-folder release (train/<class>, test/<class>) and the `fer2013.csv` release."""

from __future__ import annotations

import csv
import io
import re

import cv2
import numpy as np

from ferray.config import IngestSettings
from ferray.data.datasets.base import Entry, Listing, find_root, stray_entry, unsafe_entry
from ferray.data.io import Tree, TreeFile
from ferray.data.schema import LABELS, status

# Official splits by file-name prefix (MANIFEST): PublicTest is the validation split.
PREFIX_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FOLDER_SPLIT = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}
USAGE_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
_FOLDERS = re.compile(r"^(train|test|training|val|validation)/[^/]+/[^/]+$", re.IGNORECASE)
BAD_PIXELS = status("decode", "bad_pixels")


def read_images(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    root = find_root(files, lambda rest: bool(_FOLDERS.match(rest)))
    listing = Listing()
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        if root is None or not file.relpath.startswith(root) or not _FOLDERS.match(file.relpath[len(root) :]):
            listing.entries.append(stray_entry(file.relpath, file, "fer2013"))
            continue
        rel = file.relpath[len(root) :]
        folder, label, name = rel.split("/")
        prefix = name.split("_", 1)[0]
        split = PREFIX_SPLIT.get(prefix, FOLDER_SPLIT[folder.lower()])
        listing.entries.append(Entry(relpath=rel, member=file.member, split=split, label_name=label, size=file.size))
    return listing


def read_csv(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    """Rows of `emotion,pixels,Usage`; SOURCE is the CSV itself or a folder/archive holding it."""
    listing = Listing()
    csv_files = [f for f in files if f.relpath and f.relpath.lower().endswith(".csv")]
    for file in files:
        if file not in csv_files:
            listing.entries.append(unsafe_entry(file) if file.relpath is None else stray_entry(file.relpath, file, "fer2013-csv"))
    for file in csv_files:
        text = io.StringIO(tree.read(file.member).decode("utf-8-sig"))
        reader = csv.DictReader(text)
        for number, row in enumerate(reader, start=1):
            rel = f"{file.relpath}#{number:05d}"
            emotion = (row.get("emotion") or "").strip()
            usage = (row.get("Usage") or "").strip()
            label = LABELS[int(emotion)] if emotion.isdigit() and int(emotion) < len(LABELS) else None
            entry = Entry(relpath=rel, member=None, split=USAGE_SPLIT.get(usage), label_name=label, pixels=row.get("pixels"))
            if label is None:
                entry = Entry(relpath=rel, member=None, split=entry.split, label_name=emotion or None,
                              pixels=entry.pixels, status=status("ingest", "no_label"), error=f"emotion {emotion!r} not in 0..6")
            listing.entries.append(entry)
    return listing


def pixels_to_png(pixels: str | None) -> bytes:
    """A CSV `pixels` field (2,304 space-separated grey values) as lossless PNG bytes."""
    try:
        values = np.array((pixels or "").split(), dtype=np.int64)
    except ValueError:
        raise ValueError("pixels are not integers") from None
    if values.size != 48 * 48 or values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise ValueError(f"expected 2304 values in 0..255, got {values.size}")
    ok, encoded = cv2.imencode(".png", values.astype(np.uint8).reshape(48, 48))
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()
