"""Any `[<split>/]<class>/<image>` tree; class names map onto the 7 by name, others keep a null label."""

from __future__ import annotations

from ferray.config import IngestSettings
from ferray.data.datasets.base import NO_LABEL, Entry, Listing, unsafe_entry
from ferray.data.io import Tree, TreeFile

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    listing = Listing()
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        parts = file.relpath.split("/")
        if len(parts) < 2:
            listing.entries.append(Entry(relpath=file.relpath, member=file.member, size=file.size,
                                         status=NO_LABEL, error="file is not inside a class folder"))
            continue
        grand = parts[-3].lower() if len(parts) >= 3 else ""
        listing.entries.append(Entry(relpath=file.relpath, member=file.member, size=file.size,
                                     split=SPLIT_FOLDERS.get(grand), label_name=parts[-2]))
    return listing
