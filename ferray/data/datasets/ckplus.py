"""CK+: the CK+48 class folders, or the full release (last frame of each labelled sequence)."""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict

from ferray.config import IngestSettings
from ferray.data.datasets.base import MISSING, Entry, Listing, find_root, stray_entry, unsafe_entry
from ferray.data.io import Tree, TreeFile

CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise", "neutral")
# Full-release emotion codes 0..7.
CODES = ("neutral", "anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
_CK48 = re.compile(r"^(?:CK\+48/)?(" + "|".join(CLASSES) + r")/[^/]+$", re.IGNORECASE)
_FRAME = re.compile(r"^cohn-kanade-images/(S\d+)/(\d+)/[^/]+\.png$", re.IGNORECASE)
_EMOTION = re.compile(r"^Emotion/(S\d+)/(\d+)/([^/]+)_emotion\.txt$", re.IGNORECASE)
_METADATA = ("Landmarks/", "FACS/")


def _full_anchor(rest: str) -> bool:
    return bool(_EMOTION.match(rest))


def read(tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing:
    full_root = find_root(files, _full_anchor)
    if full_root is not None:
        return _read_full(tree, files, full_root)
    root = find_root(files, lambda rest: bool(_CK48.match(rest)))
    listing = Listing()
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        rel = file.relpath[len(root) :] if root is not None and file.relpath.startswith(root) else None
        match = _CK48.match(rel) if rel is not None else None
        if match is None:
            listing.entries.append(stray_entry(file.relpath, file, "ckplus"))
            continue
        listing.entries.append(Entry(relpath=rel, member=file.member, label_name=match.group(1).lower(), size=file.size))
    return listing


def _read_full(tree: Tree, files: list[TreeFile], root: str) -> Listing:
    listing = Listing()
    frames: dict[tuple[str, str], list[TreeFile]] = defaultdict(list)
    emotions: dict[tuple[str, str], TreeFile] = {}
    for file in files:
        if file.relpath is None:
            listing.entries.append(unsafe_entry(file))
            continue
        rel = file.relpath[len(root) :] if file.relpath.startswith(root) else None
        if rel is None:
            listing.entries.append(stray_entry(file.relpath, file, "ckplus"))
        elif match := _FRAME.match(rel):
            frames[(match.group(1), match.group(2))].append(file)
        elif match := _EMOTION.match(rel):
            emotions[(match.group(1), match.group(2))] = file
            listing.ignored["emotion label files"] += 1
        elif rel.startswith(_METADATA) or posixpath.basename(rel).startswith("."):
            listing.ignored["metadata (Landmarks, FACS, hidden)"] += 1
        else:
            listing.entries.append(stray_entry(file.relpath, file, "ckplus"))
    for sequence in sorted(set(frames) | set(emotions)):
        seq_frames = sorted(frames.get(sequence, []), key=lambda f: f.member)
        label_file = emotions.get(sequence)
        if label_file is None:
            listing.ignored["frames of unlabelled sequences"] += len(seq_frames)
            continue
        code = tree.read(label_file.member).decode("ascii", "replace").split()
        name = CODES[int(float(code[0]))] if code and 0 <= float(code[0]) < len(CODES) else None
        subject, number = sequence
        if not seq_frames:
            rel = f"cohn-kanade-images/{subject}/{number}/(last frame)"
            listing.entries.append(Entry(relpath=rel, member=None, label_name=name, status=MISSING,
                                         error="labelled sequence has no frames in the source"))
            continue
        # The labelled frame is the last (peak) frame of the sequence.
        last = seq_frames[-1]
        listing.ignored["earlier frames of labelled sequences"] += len(seq_frames) - 1
        listing.entries.append(Entry(relpath=last.relpath[len(root) :], member=last.member, label_name=name, size=last.size))
    return listing
