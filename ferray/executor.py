"""The one shard executor: plan units -> skip done -> Ray Data -> sink (ok, _quarantine, _stats, marker) -> summary.

Every command that turns shards into shards (ingest, align, embed, annotate) is a `Stage` run here. A
stage declares its name, version, output schema and resources, and one or more `Part`s: built once per
Ray actor (`setup()`), then called on each shard's work. The executor fingerprints every output shard
with the stage's name, version and schema on top of the stage's own key, so a changed stage redoes
exactly its shards; it writes a shard's rows, quarantine, stats and, last, its marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa

from ferray.config import RaySettings, StorageSettings
from ferray.data import io
from ferray.data.schema import LABELS, STATUS_OK
from ferray.errors import InputError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- what a run did


@dataclass
class Summary:
    """What a stage run did, for the one-screen report and `_ferray/<stage>.json`."""

    stage: str
    source: str
    out: str
    rows: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_split_label: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    extra: Counter[str] = field(default_factory=Counter)  # stage-specific counts (face_source …)
    ignored: Counter[str] = field(default_factory=Counter)
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        self.rows += stats["rows"]
        self.by_status.update(stats["by_status"])
        self.extra.update(stats.get("extra", {}))
        for split, counts in stats["by_split_label"].items():
            self.by_split_label[split].update(counts)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("by_status", "extra", "ignored"):
            data[name] = dict(data[name])
        data["by_split_label"] = {k: dict(v) for k, v in sorted(self.by_split_label.items())}
        return data

    def render(self) -> str:
        """The one-screen summary the command line prints."""
        data = self.to_dict()
        lines = [f"ferray {data['stage']}: {data['source']} -> {data['out']}"]
        lines.append(f"  rows in: {data['rows']}   ok: {data['by_status'].get(STATUS_OK, 0)}   time: {data['seconds']:.1f} s")
        lines.append(f"  shards: {data['shards_written']} written, {data['shards_skipped']} skipped (already complete)")
        lines.append("  by status: " + ", ".join(f"{k} {v}" for k, v in sorted(data["by_status"].items())))
        table = data.get("by_split_label") or {}
        if table:
            seen = {name for counts in table.values() for name in counts}
            classes = [c for c in LABELS if c in seen] + sorted(seen - set(LABELS))
            width = max(10, *(len(c) + 1 for c in classes))
            lines.append("  ok rows by split x class:")
            lines.append("    " + "split".ljust(8) + "".join(c.rjust(width) for c in classes) + "total".rjust(width))
            for split, counts in table.items():
                cells = "".join(str(counts.get(c, 0)).rjust(width) for c in classes)
                lines.append("    " + split.ljust(8) + cells + str(sum(counts.values())).rjust(width))
        if data.get("extra"):
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in sorted(data["extra"].items())))
        if data.get("ignored"):
            lines.append("  not rows (by design): " + ", ".join(f"{k} {v}" for k, v in sorted(data["ignored"].items())))
        return "\n".join(lines)


def shard_stats(shard: str, table: pa.Table, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts by status and, for ok rows, by split × label — what `_stats/<shard>.json` holds."""
    by_split: dict[str, Counter[str]] = defaultdict(Counter)
    names = table["label_name"].to_pylist() if "label_name" in table.schema.names else [None] * table.num_rows
    splits = table["split"].to_pylist() if "split" in table.schema.names else [None] * table.num_rows
    statuses = table["status"].to_pylist()
    for split, name, row_status in zip(splits, names, statuses):
        if row_status == STATUS_OK:
            by_split[split or "none"][name or "unlabelled"] += 1
    return {
        "shard": shard,
        "rows": table.num_rows,
        "by_status": dict(Counter(statuses)),
        "by_split_label": {split: dict(counts) for split, counts in sorted(by_split.items())},
        "extra": dict(extra or {}),
    }


# --------------------------------------------------------------------------- the stage contract


@dataclass(frozen=True)
class Resources:
    """What one actor of a stage (or of one of its parts) asks Ray for, and how it is fed."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 64  # rows per call of the batch function (row stages)
    pool_size: int | None = None  # actors; None: as many as the cluster fits
    tasks_per_actor: int | None = None  # shards queued per actor; None: Ray Data's default
    runtime_env: dict[str, Any] | None = None


class Part:
    """One piece of a stage inside a Ray actor: `setup()` once, then one call per shard.

    The first part gets the shard's payload and `table=None`; a later part gets the table and the
    extra counts the previous one made. The last part's table is the shard's output.
    """

    resources: Resources = Resources()

    def setup(self) -> None:
        """Build heavy objects (Dlib models, Keras models, archive handles); runs once per actor."""

    def __call__(self, payload: Any, table: pa.Table | None, extra: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        raise NotImplementedError


class Stage(Part):
    """A shards-to-shards step: name, version, output schema, resources and its parts (itself by default)."""

    name: ClassVar[str]
    # Bump when a change alters the rows a stage writes for the same input: its shards are then redone.
    version: ClassVar[int]
    schema: pa.Schema

    def parts(self) -> Sequence[Part]:
        return (self,)

    def stats(self, shard: str, table: pa.Table, payload: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """`_stats/<shard>.json` of a written shard."""
        return shard_stats(shard, table, extra)

    @classmethod
    def identity(cls) -> str:
        """What every shard fingerprint of this stage starts with: its name, version and output schema."""
        schema = ",".join(f"{f.name}:{f.type}:{f.nullable}" for f in cls.schema)
        return f"{cls.name}/v{cls.version}/{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


class RowStage(Stage):
    """A stage whose unit is one finished input shard and whose batch function maps row batches."""

    def __init__(self, storage: StorageSettings) -> None:
        self.storage = storage

    def batch(self, table: pa.Table) -> pa.Table:
        """Output rows of a batch of input rows (Arrow in, Arrow out; never drops a row)."""
        raise NotImplementedError

    def extra_stats(self, table: pa.Table) -> dict[str, Any]:
        return {}

    def __call__(self, payload: Any, table: pa.Table | None, extra: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        started = time.perf_counter()
        rows = io.read_parquet(str(payload), self.storage)
        read = time.perf_counter()
        parts = [self.batch(pa.Table.from_batches([chunk])) for chunk in rows.to_batches(max_chunksize=self.resources.batch_size)]
        output = pa.concat_tables(parts).cast(self.schema) if parts else self.schema.empty_table()
        log.info("%s: %s, %d rows: read %.2fs, %s %.2fs", self.name, payload, output.num_rows, read - started,
                 self.name, time.perf_counter() - read)
        return output, self.extra_stats(output)


@dataclass(frozen=True)
class ShardUnit:
    """One output shard to make: its name, what it depends on beyond the stage, and the work to read."""

    shard: str
    key: str  # input fingerprint and the settings that change its rows
    payload: Any  # what the first part reads: an input URI, ingest entries, media units


def fingerprint(stage: Stage, key: str) -> str:
    return hashlib.sha256(f"{stage.identity()}\n{key}".encode()).hexdigest()


def upstream_units(source: str, storage: StorageSettings, knobs: dict[str, Any]) -> list[ShardUnit]:
    """One unit per finished shard of `source`, keyed by its marker's fingerprint and the stage's knobs."""
    config = json.dumps(knobs, sort_keys=True, default=str)
    units = []
    for uri in io.completed_shards(source, storage):
        shard = uri.rsplit("/", 1)[-1][: -len(".parquet")]
        upstream = io.read_json(io.join(source, io.MARKERS, f"{shard}.json"), storage)["fingerprint"]
        units.append(ShardUnit(shard, f"{upstream}\n{config}", uri))
    return units


# --------------------------------------------------------------------------- Ray Data actors


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class ShardWorker:
    """Ray Data actor: the stage's (remaining) parts built once; each shard in, written, its stats out."""

    def __init__(self, stage: Stage, parts: tuple[int, int], out: str, storage: StorageSettings) -> None:
        self.stage, self.sink = stage, io.ShardSink(out, storage)
        self.parts = list(stage.parts())[parts[0] : parts[1]]
        for part in self.parts:
            part.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for i, shard in enumerate(batch["shard"]):
            payload = pickle.loads(batch["payload"][i])
            table, extra = _handed(batch, i)
            for part in self.parts:
                table, extra = part(payload, table, extra)
            stats = self.stage.stats(str(shard), table, payload, extra)
            self.sink.write(str(shard), table, str(batch["fingerprint"][i]), stats)
            results.append(json.dumps(stats))
        return {"stats": np.array(results, dtype=object)}


class PartWorker:
    """Split pools, the first actors: a part that hands its table on (Arrow IPC) to the next pool."""

    def __init__(self, stage: Stage, index: int) -> None:
        self.part = list(stage.parts())[index]
        self.part.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables, extras = [], []
        for i in range(len(batch["shard"])):
            table, extra = _handed(batch, i)
            table, extra = self.part(pickle.loads(batch["payload"][i]), table, extra)
            tables.append(_encode(table))
            extras.append(json.dumps(extra))
        return {**batch, "table": np.array(tables, dtype=object), "extra": np.array(extras, dtype=object)}


def _handed(batch: dict[str, np.ndarray], i: int) -> tuple[pa.Table | None, dict[str, Any]]:
    """The table and counts a previous pool handed on, if any."""
    if "table" not in batch:
        return None, {}
    return pa.ipc.open_stream(pa.py_buffer(batch["table"][i])).read_all(), json.loads(batch["extra"][i])


# --------------------------------------------------------------------------- the run


def cluster() -> tuple[int, float]:
    """CPUs and GPUs of the Ray cluster this driver is on."""
    import ray

    from ferray.runtime import cluster_cpus

    return cluster_cpus(), float(ray.cluster_resources().get("GPU", 0))


def pool_size(name: str, resources: Resources) -> int:
    """Actors that fit the cluster at once: by CPUs, and by GPUs when the part uses them."""
    if resources.pool_size is not None:
        return resources.pool_size
    cpus, gpus = cluster()
    size = int(cpus // max(resources.num_cpus, 1e-3))
    if resources.num_gpus:
        size = min(size, int(gpus // resources.num_gpus))
    if size < 1:
        raise InputError(f"{name}: the cluster cannot fit one worker ({resources.num_cpus} CPU, {resources.num_gpus} GPU)")
    return size


def pending(stage: Stage, units: Sequence[ShardUnit], out: str, storage: StorageSettings,
            summary: Summary) -> list[dict[str, Any]]:
    """The units whose shard is not finished from the same input and stage; finished ones count as skipped."""
    sink = io.ShardSink(out, storage)
    todo = []
    for unit in units:
        done = sink.completed(unit.shard, fingerprint(stage, unit.key))
        if done is None:
            todo.append(item(stage, unit))
        else:
            summary.add(done)
            summary.shards_skipped += 1
    return todo


def item(stage: Stage, unit: ShardUnit) -> dict[str, Any]:
    """A unit as a Ray Data row: its shard name, fingerprint and pickled payload."""
    return {"shard": unit.shard, "fingerprint": fingerprint(stage, unit.key), "payload": pickle.dumps(unit.payload)}


def execute(stage: Stage, items: list[dict[str, Any]], out: str, storage: StorageSettings, ray_settings: RaySettings,
            pools: Literal["fused", "split"] = "fused") -> Iterator[dict[str, Any]]:
    """Run the pending shards on one Ray Data graph; yields each shard's stats as it is written.

    `fused`: one pool of actors, each holding every part (the stage's own resources). `split`: a pool
    per part, each with the part's resources, handing tables on (CPU detection feeding GPU labelling).
    """
    import ray

    from ferray.runtime import ensure_ray

    if not items:
        return
    ensure_ray(ray_settings)
    parts = list(stage.parts())
    dataset = ray.data.from_items(items, override_num_blocks=len(items))

    def pool(resources: Resources) -> Any:
        size = max(1, min(len(items), pool_size(stage.name, resources)))
        extra = {} if resources.tasks_per_actor is None else {"max_tasks_in_flight_per_actor": resources.tasks_per_actor}
        remote = {"runtime_env": resources.runtime_env} if resources.runtime_env else {}
        return {"compute": ray.data.ActorPoolStrategy(size=size, **extra), "num_cpus": resources.num_cpus,
                "num_gpus": resources.num_gpus or None, "batch_size": 1, **remote}

    if pools == "split" and len(parts) > 1:
        for index, part in enumerate(parts[:-1]):
            dataset = dataset.map_batches(PartWorker, fn_constructor_kwargs={"stage": stage, "index": index},
                                          **pool(part.resources))
        last = (len(parts) - 1, len(parts))
        dataset = dataset.map_batches(ShardWorker, fn_constructor_kwargs={"stage": stage, "parts": last, "out": out,
                                                                          "storage": storage}, **pool(parts[-1].resources))
    else:
        dataset = dataset.map_batches(ShardWorker, fn_constructor_kwargs={"stage": stage, "parts": (0, len(parts)),
                                                                          "out": out, "storage": storage},
                                      **pool(stage.resources))
    for done, row in enumerate(dataset.iter_rows(), start=1):
        stats = json.loads(row["stats"])
        log.info("%s: shard %s written (%d/%d): %d rows", stage.name, stats["shard"], done, len(items), stats["rows"])
        yield stats


def run(stage: Stage, units: Sequence[ShardUnit], source: str, out: str, storage: StorageSettings,
        ray_settings: RaySettings, summary: Summary | None = None) -> Summary:
    """Plan -> skip done -> Ray Data -> sink -> summary, for stages whose shards are named up front."""
    started = time.perf_counter()
    summary = summary or Summary(stage=stage.name, source=source, out=out)
    items = pending(stage, units, out, storage, summary)
    log.info("%s: %d shards, %d already done", stage.name, len(units), summary.shards_skipped)
    for stats in execute(stage, items, out, storage, ray_settings):
        summary.add(stats)
        summary.shards_written += 1
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def write_meta(out: str, summary: Summary, settings: Any, storage: StorageSettings, **more: Any) -> None:
    """`OUT/_ferray/<stage>.json`: the run's summary and its settings (secrets masked)."""
    io.write_json(io.join(out, io.META, f"{summary.stage}.json"),
                  {**more, "summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
