"""What every reader returns: entries to ingest, plus the files it deliberately set aside."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from ferray.config import IngestSettings
from ferray.data.io import Tree, TreeFile, printable
from ferray.data.schema import status

UNEXPECTED = status("ingest", "unexpected_file")
NO_LABEL = status("ingest", "no_label")
MISSING = status("ingest", "missing_file")
UNSAFE = status("ingest", "unsafe_path")


@dataclass(frozen=True)
class Entry:
    """One future row: where its bytes are and what the layout says about it."""

    relpath: str  # path inside the dataset root; the row id derives from it
    member: str | None  # tree member holding the bytes; None when there is nothing to read
    split: str | None = None
    label_name: str | None = None  # the dataset's own class name; mapped onto the 7 later
    size: int = 0
    pixels: str | None = None  # FER-2013 CSV rows carry pixels, not a file
    status: str = "ok"
    error: str | None = None


@dataclass
class Listing:
    """A reader's result: entries, and counts of files that are not samples (label files …)."""

    entries: list[Entry] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)


class Reader(Protocol):
    def __call__(self, tree: Tree, files: list[TreeFile], settings: IngestSettings) -> Listing: ...


def find_root(files: Iterable[TreeFile], anchor: Callable[[str], bool], depth: int = 2) -> str | None:
    """The shallowest prefix ('' or up to `depth` enclosing folders) under which `anchor` matches."""
    paths = [f.relpath for f in files if f.relpath]
    candidates = [""]
    for level in range(1, depth + 1):
        candidates += sorted({"/".join(p.split("/")[:level]) + "/" for p in paths if p.count("/") >= level})
    for prefix in candidates:
        if any(p.startswith(prefix) and anchor(p[len(prefix) :]) for p in paths):
            return prefix
    return None


def unsafe_entry(file: TreeFile) -> Entry:
    return Entry(relpath=printable(file.member), member=None, status=UNSAFE, error="member path escapes the source root")


def stray_entry(rel: str, file: TreeFile, layout: str) -> Entry:
    """A file that is not part of the layout: kept as a status row, never dropped."""
    return Entry(relpath=rel, member=file.member, size=file.size, status=UNEXPECTED, error=f"not part of the {layout} layout")


def carve_val(relpath: str, settings: IngestSettings) -> bool:
    """Deterministically assign a train row to `val` from a seeded hash of its path."""
    digest = hashlib.blake2b(f"{settings.seed}:{relpath}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < settings.val_fraction
