"""Faults on the local Ray: a worker process SIGKILLed in the middle of `align` and of `annotate`, and a
whole `ferray annotate` job killed and run again. Each ends with the output of a clean run: the same
ids, no row twice, nothing lost.

Workers are killed from outside, as the kernel's OOM killer or a lost node would: the test finds the
actor's process under this session's raylet by the title Ray gives it while it runs a task
(`ray::MapWorker(MapBatches(ShardWorker)).submit`), so the product needs no fault hook. A training
worker killed mid-epoch is tests/test_train.py::test_two_workers_survive_a_killed_worker_and_resume.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pytest
from PIL import Image

from conftest import SAMPLE_ZIP
from ferray import annotate
from ferray.data import ingest
from ferray.faces import stage as align
from ferray.config import Settings, StorageSettings, load_settings
from test_annotate import all_rows
from test_faces import SAMPLES, canvas, load_face
from test_ingest import outputs

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # minutes: workers killed mid-run

LOCAL = StorageSettings()
ANNOTATE_IMAGES = 10
# Small shards, so that a run is many tasks and a kill lands while others are still to do.
ANNOTATE_KNOBS = {"shard_units": 2}
# The actors annotate may run: one fused kind, or detection and classification apart.
ANNOTATE_WORKERS = ("ShardWorker", "PartWorker")  # fused, or the split pools


# --------------------------------------------------------------------------- finding and killing workers


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc (no psutil in the environment)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # the process ended while we looked
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry))
    return tree


def ray_workers(title: str) -> dict[int, str]:
    """This session's Ray worker processes whose title starts with `ray::<title>`: pid → title.

    Only descendants of this process (its raylet's workers) count, so another session's Ray on the
    same machine is never touched.
    """
    tree, found, todo = _children(), {}, [os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                name = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if name.startswith(f"ray::{title}"):
                found[child] = name
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finished_shards(out: Path) -> int:
    markers = out / "_markers"
    return len(list(markers.glob("*.json"))) if markers.is_dir() else 0


class Killer(threading.Thread):
    """SIGKILLs one worker of the given stage classes once OUT has a finished shard and the worker is busy."""

    def __init__(self, stages: tuple[str, ...], out: Path, timeout: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.titles = tuple(f"MapWorker(MapBatches({stage}))" for stage in stages)
        self.out, self.deadline = out, time.monotonic() + timeout
        self.killed: int | None = None
        self.done_at_kill = -1
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            done = finished_shards(self.out)
            busy = [pid for title in self.titles for pid, name in ray_workers(title).items() if name.endswith(".submit")]
            if done and busy:
                os.kill(busy[0], signal.SIGKILL)
                self.killed, self.done_at_kill = busy[0], done
                return
            time.sleep(0.01)


def run_with_kill(stages: tuple[str, ...], out: Path, job: Callable[[], Any]) -> tuple[Any, Killer]:
    killer = Killer(stages, out)
    killer.start()
    try:
        result = job()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, f"no busy {' or '.join(stages)} worker was found to kill"
    assert not alive(killer.killed)
    return result, killer


# --------------------------------------------------------------------------- align


def test_align_survives_a_killed_worker(tmp_path: Path, settings: Settings) -> None:
    small = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"shard_rows": 3})})
    ingested = tmp_path / "ingested"
    ingest.run(small, "fer2013", str(SAMPLE_ZIP), str(ingested))
    clean = align.run(settings, str(ingested), str(tmp_path / "clean"))
    out = tmp_path / "killed"
    summary, killer = run_with_kill(("ShardWorker",), out, lambda: align.run(settings, str(ingested), str(out)))

    assert 0 < killer.done_at_kill < clean.shards_written, "the kill landed mid-run"
    assert summary.shards_written == clean.shards_written == 12 and summary.rows == clean.rows == 35
    for got, want in zip(outputs(str(out), LOCAL), outputs(str(tmp_path / "clean"), LOCAL)):
        assert got.equals(want), "the same rows, ids, faces and statuses as a clean run"
    assert len(set(outputs(str(out), LOCAL)[0]["id"].to_pylist())) == 35


# --------------------------------------------------------------------------- annotate


def annotate_settings() -> Settings:
    return load_settings(ray={"progress_bars": False}, annotate=ANNOTATE_KNOBS)


@dataclass(frozen=True)
class Clean:
    """A folder of face photos and its uninterrupted annotation."""

    source: Path
    out: Path
    rows: pa.Table
    shards: int


def sorted_rows(out: Path) -> pa.Table:
    return all_rows(str(out), LOCAL).sort_by([("id", "ascending")])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Clean:
    source = tmp_path_factory.mktemp("faults") / "photos"
    source.mkdir()
    rng = random.Random(7)
    for index in range(ANNOTATE_IMAGES):
        image, _ = canvas(load_face(SAMPLES[index % len(SAMPLES)]), rng)
        Image.fromarray(image).save(source / f"{index:03d}.png")
    out = source.parent / "clean"
    summary = annotate.run(annotate_settings(), "default", str(source), str(out))
    assert summary.shards_written >= 3, "enough shards for a kill to land mid-run"
    return Clean(source, out, sorted_rows(out), summary.shards_written)


def same_as_clean(out: Path, clean: Clean) -> None:
    rows = sorted_rows(out)
    assert len(set(rows["id"].to_pylist())) == rows.num_rows, "no row twice"
    assert rows.num_rows == clean.rows.num_rows >= ANNOTATE_IMAGES
    for column in ("id", "source_path", "face_index", "status", "label", "bbox"):
        assert rows[column].equals(clean.rows[column]), column
    for got, want in zip(rows["probs"].to_pylist(), clean.rows["probs"].to_pylist()):
        assert got == pytest.approx(want, abs=1e-5)


def test_annotate_survives_a_killed_worker(clean: Clean, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    summary, killer = run_with_kill(
        ANNOTATE_WORKERS, out, lambda: annotate.run(annotate_settings(), "default", str(clean.source), str(out)))
    assert 0 < killer.done_at_kill < clean.shards, "the kill landed mid-run"
    assert summary.shards_written == clean.shards and summary.rows == clean.rows.num_rows
    same_as_clean(out, clean)


def test_a_killed_annotate_job_reruns_to_the_same_output(clean: Clean, tmp_path: Path) -> None:
    """`ferray annotate` as its own driver on this session's Ray, SIGKILLed after its first shard."""
    import ray

    out = tmp_path / "interrupted"
    env = {**os.environ, "FERRAY_RAY__ADDRESS": ray.get_runtime_context().gcs_address,
           "FERRAY_RAY__PROGRESS_BARS": "false", "FERRAY_ANNOTATE__SHARD_UNITS": str(ANNOTATE_KNOBS["shard_units"])}
    job = subprocess.Popen([sys.executable, "-m", "ferray", "annotate", "default", str(clean.source), str(out),
                            "--log-level", "WARNING"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not finished_shards(out):
        assert job.poll() is None, job.stderr.read().decode()[-2000:] if job.stderr else job.returncode
        assert time.monotonic() < deadline, "the job wrote no shard in time"
        time.sleep(0.05)
    job.kill()  # SIGKILL: no cleanup of any kind, as when a node or the scheduler kills the driver
    job.wait()
    done = finished_shards(out)
    assert 0 < done < clean.shards, "the job was stopped mid-run"

    resumed = annotate.run(annotate_settings(), "default", str(clean.source), str(out))
    # The shards finished before the kill are kept, not redone (the dying job may have finished one more).
    assert resumed.shards_skipped >= done and resumed.shards_written >= 1
    assert resumed.rows == clean.rows.num_rows
    same_as_clean(out, clean)
    # Every file in OUT belongs to a marked shard: the leftovers of the killed job are gone.
    markers = {p.stem for p in (out / "_markers").glob("*.json")}
    assert len(markers) == resumed.shards_skipped + resumed.shards_written
    assert {p.stem for p in out.glob("part-*.parquet")} <= markers
    assert {p.stem for p in (out / "_stats").glob("*.json")} == markers
