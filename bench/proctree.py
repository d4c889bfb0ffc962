"""The processes a bench started (its local Ray: raylet, GCS, workers, actors), read from /proc.

The benches measure and kill only their own descendants, so another Ray on the same machine is never
counted or touched. /proc rather than psutil: psutil is not a dependency.
"""

from __future__ import annotations

import os
from pathlib import Path


def children() -> dict[int, list[int]]:
    """Parent pid → child pids of every process now running."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended while listed
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(root: int | None = None) -> list[int]:
    """Every process `root` (default: this one) started, directly or not."""
    tree, out, todo = children(), [], [root or os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def title(pid: int) -> str:
    """The process title (Ray names its workers `ray::<actor or task>`); "" once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used; 0 once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def rss(pid: int) -> int:
    """Resident bytes, from /proc/PID/statm: a counter read, unlike smaps_rollup's walk of every mapping
    (milliseconds a large process, which a sampler every fraction of a second takes from the CPUs it measures)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS shares pages (the object store's, TensorFlow's) between their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.split()[-1] == "kB"}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except (OSError, ValueError, IndexError):  # ended while read: an empty or cut line
        return 0, 0
