"""Running a stage's pending shards on Ray Data: actor pools (fused, or split per part), the sink, the stats."""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa

from ferray.config import RaySettings, StorageSettings
from ferray.data import io
from ferray.errors import InputError
from ferray.executor.stage import Resources, ShardUnit, Stage, fingerprint
from ferray.executor.summary import Summary

log = logging.getLogger(__name__)

Pools = Literal["fused", "split"]


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
            pools: Pools = "fused") -> Iterator[dict[str, Any]]:
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
