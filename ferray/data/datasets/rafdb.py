"""RAF-DB basic: `Image/aligned|original/*.jpg` labelled by `EmoLabel/list_patition_label.txt`."""

from __future__ import annotations

import posixpath

from ferray.config import IngestSettings
from ferray.data.datasets.base import MISSING, NO_LABEL, Entry, Listing, carve_val, find_root, stray_entry, unsafe_entry
from ferray.data.io import Tree, TreeFile
from ferray.errors import InputError

LABEL_FILE = "EmoLabel/list_patition_label.txt"
# RAF-DB numbers its basic classes 1..7 in this order.
CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "angry", 7: "neutral"}


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            labels[parts[0]] = parts[1]
    return labels


def read(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    root = find_root(files, lambda rest: rest == LABEL_FILE)
    if root is None:
        raise InputError(f"rafdb: {LABEL_FILE} not found in {tree.uri}")
    labels = _parse_labels(tree.read(root + LABEL_FILE).decode("utf-8", "replace"))
    images = {f.relpath[len(root) :]: f for f in files if f.relpath and f.relpath.startswith(root + "Image/")}
    aligned = any(rel.startswith("Image/aligned/") for rel in images)
    variant = settings.rafdb_images if settings.rafdb_images != "auto" else ("aligned" if aligned else "original")
    folder = f"Image/{variant}/"

    listing = Listing()
    seen: set[str] = set()
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        rel = file.relpath[len(root) :] if file.relpath.startswith(root) else None
        if rel == LABEL_FILE:
            listing.ignored["label file"] += 1
            continue
        if rel is not None and rel.startswith("Image/") and not rel.startswith(folder) and rel.count("/") == 2:
            listing.ignored[f"other image variant ({rel.split('/')[1]})"] += 1
            continue
        if rel is None or not rel.startswith(folder) or rel.count("/") != 2:
            listing.entries.append(stray_entry(file.relpath, file, "rafdb"))
            continue
        stem, ext = posixpath.splitext(posixpath.basename(rel))
        key = (stem[: -len("_aligned")] if stem.endswith("_aligned") else stem) + ext
        seen.add(key)
        split = "test" if key.startswith("test_") else "train"
        if split == "train" and carve_val(rel, settings):
            split = "val"
        code = labels.get(key)
        if code is None or int(code) not in CODES:
            listing.entries.append(Entry(relpath=rel, member=file.member, split=split, size=file.size,
                                         status=NO_LABEL, error=f"{key} has no basic label"))
            continue
        listing.entries.append(Entry(relpath=rel, member=file.member, split=split, label_name=CODES[int(code)], size=file.size))
    # Labelled images that are not in the source are rows too: a short download must not pass unseen.
    for key, code in sorted(labels.items()):
        if key in seen:
            continue
        stem, ext = posixpath.splitext(key)
        rel = folder + (f"{stem}_aligned{ext}" if variant == "aligned" else key)
        split = "test" if key.startswith("test_") else "train"
        if split == "train" and carve_val(rel, settings):
            split = "val"
        listing.entries.append(Entry(relpath=rel, member=None, split=split, label_name=CODES.get(int(code)),
                                     status=MISSING, error="listed in the label file, not in the source"))
    return listing
