"""JAFFE: `KA.AN1.39.tiff` — subject, expression code and index, image id; label from the name."""

from __future__ import annotations

import posixpath
import re

from ferray.config import IngestSettings
from ferray.data.datasets.base import NO_LABEL, Entry, Listing, stray_entry, unsafe_entry
from ferray.data.io import Tree, TreeFile

_NAME = re.compile(r"^([A-Z]{2})\.([A-Z]{2})(\d+)\.(\d+)\.tiff?$", re.IGNORECASE)
CODES = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise"}


def read(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    listing = Listing()
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        match = _NAME.match(posixpath.basename(file.relpath))
        if match is None:
            listing.entries.append(stray_entry(file.relpath, file, "jaffe"))
            continue
        # Ids use the file name alone, so a zip, a folder or an enclosing folder give the same id.
        rel = posixpath.basename(file.relpath)
        code = match.group(2).upper()
        if code not in CODES:
            listing.entries.append(Entry(relpath=rel, member=file.member, size=file.size, label_name=code.lower(),
                                         status=NO_LABEL, error=f"unknown JAFFE expression code {code}"))
            continue
        listing.entries.append(Entry(relpath=rel, member=file.member, label_name=CODES[code], size=file.size))
    return listing
