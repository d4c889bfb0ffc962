"""Soak: `ferray annotate` on a generated archive far larger than the fast paths, a worker SIGKILLed
every so often; prints rows/s, peak memory and the conservation check (every input exactly once).

Usage:
  .venv/bin/python bench/soak.py [--images 200000] [--kill-every 60] [--cpus N] [--model default] [--work DIR]

The archive is a zip of small real images: the 35 bundled FER-2013 faces (48×48 JPEG) repeated under
distinct names, with about 1.4% bad files mixed in (truncated JPEGs, zero-byte files, text named .png),
so that quarantined rows are part of the count. Annotation runs on a fresh local Ray started by this
process; a killer thread SIGKILLs one busy annotate actor (found under this process's raylet by its
Ray process title) every --kill-every seconds, as an OOM killer or a lost node would, once a shard
was finished since the previous kill (so restarts never starve the run). Memory is the
peak of the summed RSS of this process and every process it started (raylet, GCS, agents, workers),
sampled every 0.5 s. The conservation check reads OUT back: each input is in exactly one finished
shard's units, every input has at least one row, no row id twice, and the rows and `_stats/` agree.
Exit status 1 when the check fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ferray import annotate
from ferray.executor.ledger import read_rows
from ferray.data import io
from ferray.config import Settings, load_settings
from ferray.executor.ledger import marked_shards

import proctree  # bench/proctree.py, beside this script

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "ferray" / "assets" / "fer2013-sample.zip"
# The annotate actors there may be: one fused kind, or detection and classification apart.
WORKERS = tuple(f"ray::MapWorker(MapBatches({name}))" for name in ("AnnotateWorker", "DetectWorker", "LabelWorker"))
log = logging.getLogger("bench.soak")


# --------------------------------------------------------------------------- the archive


def bad_file(index: int, face: bytes) -> tuple[str, bytes] | None:
    """Every 97th input a truncated JPEG, every 389th a zero-byte file, every 997th a text named .png."""
    if index % 997 == 0:
        return "png", b"<html><body>404 Not Found</body></html>\n"
    if index % 389 == 0:
        return "jpg", b""
    if index % 97 == 0:
        return "jpg", face[: len(face) // 2]
    return None


def build_archive(target: Path, count: int) -> list[str]:
    """A zip of `count` small images (real faces, some bad); returns its member names."""
    with zipfile.ZipFile(SAMPLE_ZIP) as sample:
        faces = [sample.read(name) for name in sorted(sample.namelist()) if name.endswith(".jpg")]
    names = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index in range(1, count + 1):
            face = faces[index % len(faces)]
            ext, data = bad_file(index, face) or ("jpg", face)
            name = f"faces/{index // 1000:04d}/{index:07d}.{ext}"
            archive.writestr(name, data)
            names.append(name)
    return names


# --------------------------------------------------------------------------- processes: memory and kills


def _busy_worker() -> int | None:
    """An annotate actor running a task now (Ray titles it `ray::MapWorker(MapBatches(X)).submit`)."""
    for pid in proctree.descendants():
        title = proctree.title(pid)
        if title.startswith(WORKERS) and title.endswith(".submit"):
            return pid
    return None


def _finished(out: Path) -> int:
    markers = out / io.MARKERS
    return len(list(markers.glob("*.json"))) if markers.is_dir() else 0


@dataclass
class Watch:
    """Samples memory every `period` s; kills a busy worker every `kill_every` s (0: never), but only
    once a shard was finished since the last kill, so that restarts never starve the run."""

    kill_every: float
    out: Path
    period: float = 0.5
    peak_rss: int = 0
    kills: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        started = last_kill = time.monotonic()
        finished_at_kill = 0
        while not self.stop.wait(self.period):
            self.peak_rss = max(self.peak_rss, sum(proctree.memory(pid)[0] for pid in [os.getpid(), *proctree.descendants()]))
            due = self.kill_every and time.monotonic() - last_kill >= self.kill_every
            if due and _finished(self.out) > finished_at_kill:
                pid = _busy_worker()
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    last_kill, finished_at_kill = time.monotonic(), _finished(self.out)
                    self.kills.append(round(last_kill - started, 1))
                    log.warning("soak: SIGKILLed annotate worker %d at %.0f s", pid, last_kill - started)


# --------------------------------------------------------------------------- conservation


@dataclass(frozen=True)
class Check:
    inputs: int
    rows: int
    by_status: Counter[str]
    problems: list[str]


def conservation(out: str, members: list[str], settings: Settings) -> Check:
    """Read OUT back: every input in exactly one finished shard, with rows; ids unique; stats agree."""
    storage = settings.storage
    sink = io.ShardSink(out, storage)
    placed: Counter[str] = Counter()
    stated: Counter[str] = Counter()
    tables = []
    for shard in marked_shards(out, storage):
        stats = io.read_json(sink.stats_uri(shard), storage)
        placed.update(unit[0] for unit in stats["units"])
        stated.update(stats["by_status"])
        tables.append(read_rows(out, storage, shard, ["id", "unit", "status"]))
    rows = pa.concat_tables(tables) if tables else pa.table({"id": [], "unit": [], "status": []})
    statuses = Counter(rows["status"].to_pylist())
    problems = []
    twice = [name for name, count in placed.items() if count > 1]
    missing = sorted(set(members) - set(placed))
    stray = sorted(set(placed) - set(members))
    without_rows = sorted(set(members) - set(rows["unit"].to_pylist()))
    if twice:
        problems.append(f"{len(twice)} inputs in more than one shard, e.g. {twice[:3]}")
    if missing or stray:
        problems.append(f"{len(missing)} inputs in no shard {missing[:3]}, {len(stray)} unknown units {stray[:3]}")
    if without_rows:
        problems.append(f"{len(without_rows)} inputs without a row, e.g. {without_rows[:3]}")
    if len(set(rows["id"].to_pylist())) != rows.num_rows:
        problems.append(f"{rows.num_rows - len(set(rows['id'].to_pylist()))} duplicate row ids")
    if statuses != stated:
        problems.append(f"rows by status {dict(statuses)} but _stats/ say {dict(stated)}")
    return Check(len(members), rows.num_rows, statuses, problems)


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000, help="images in the archive (default 200,000)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills (0: none)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--model", default="default", help="MODEL (default: the shipped model)")
    parser.add_argument("--work", help="work folder, kept (default: a temp folder, removed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="ferray-soak-")
    work = Path(args.work or temp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    archive, out = work / f"soak-{args.images}.zip", work / f"annotated-{args.images}"
    started = time.perf_counter()
    members = build_archive(archive, args.images)
    built = time.perf_counter() - started
    log.info("soak: %d images, %.1f MB archive in %.1f s", len(members), archive.stat().st_size / 1e6, built)

    settings = load_settings(ray={"num_cpus": args.cpus, "progress_bars": False})
    watch = Watch(args.kill_every, out)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        summary = annotate.run(settings, args.model, str(archive), str(out))
    finally:
        watch.stop.set()
        thread.join()
    wall = time.perf_counter() - started
    check = conservation(str(out), members, settings)

    print(f"soak: {len(members)} images ({archive.stat().st_size / 1e6:.1f} MB zip, built in {built:.1f} s), "
          f"{settings.ray.num_cpus or os.cpu_count()} CPUs, model {args.model}")
    print(f"  annotate: {wall:.1f} s wall, {summary.rows} rows, {summary.rows / wall:.1f} rows/s, "
          f"{len(members) / wall:.1f} images/s, {summary.shards_written} shards")
    print(f"  worker kills: {len(watch.kills)} (at {watch.kills} s)")
    print(f"  peak memory: {watch.peak_rss / 2**20:.0f} MiB RSS summed over the driver and its Ray processes "
          f"(driver alone {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    print("  rows by status: " + ", ".join(f"{k} {v}" for k, v in sorted(check.by_status.items())))
    verdict = "OK" if not check.problems else "FAILED: " + "; ".join(check.problems)
    print(f"  conservation: {check.inputs} inputs, each in exactly one shard with >= 1 row, "
          f"{check.rows} rows, unique ids, _stats agree: {verdict}")
    if temp is not None:
        temp.cleanup()
    return 0 if not check.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
