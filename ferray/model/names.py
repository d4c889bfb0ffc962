"""What names a model's files without loading Keras: `MODEL#member_N` and a file's sha256.

Kept apart from ferray.model.backbones, which imports Keras (and so TensorFlow, about 4 CPU-s): the
annotate driver and its LiteRT actors resolve models and key their graphs with these alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) since B7's file is 260 MB."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def split_member(target: str) -> tuple[str, int | None]:
    """`PATH#member_N` → (PATH, N): one member of an ensemble artifact; else (target, None)."""
    from ferray.model.ensemble import MEMBER_PREFIX

    found = re.fullmatch(rf"(.+)#{MEMBER_PREFIX}(\d+)", target)
    return (found[1], int(found[2])) if found else (target, None)
