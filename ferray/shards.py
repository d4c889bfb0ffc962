"""Shard-by-shard execution of a row stage on Ray Data: deterministic outputs, markers, stats."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

from ferray import io
from ferray.config import RaySettings, StorageSettings
from ferray.schema import STATUS_OK

log = logging.getLogger(__name__)


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


def shard_stats(shard: str, table: pa.Table, extra: dict[str, int] | None = None) -> dict[str, Any]:
    """Counts by status and, for ok rows, by split × label — what `_stats/<shard>.json` holds."""
    by_split: dict[str, Counter[str]] = defaultdict(Counter)
    names = table["label_name"].to_pylist() if "label_name" in table.schema.names else [None] * table.num_rows
    splits = table["split"].to_pylist() if "split" in table.schema.names else [None] * table.num_rows
    for split, name, row_status in zip(splits, names, table["status"].to_pylist()):
        if row_status == STATUS_OK:
            by_split[split or "none"][name or "unlabelled"] += 1
    return {
        "shard": shard,
        "rows": table.num_rows,
        "by_status": dict(Counter(table["status"].to_pylist())),
        "by_split_label": {split: dict(counts) for split, counts in sorted(by_split.items())},
        "extra": dict(extra or {}),
    }


class RowStage(Protocol):
    """A `map_batches` stage: built once per actor, called on dict-of-numpy batches, never drops rows."""

    NUM_CPUS: float
    BATCH_SIZE: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow → dict of 1-D object arrays (bytes, lists and nulls survive as Python values)."""
    out = {}
    for name in table.schema.names:
        values = table[name].to_pylist()
        array = np.empty(len(values), dtype=object)
        array[:] = values
        out[name] = array
    return out


def from_batch(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    return pa.table({f.name: pa.array(list(batch[f.name]), type=f.type) for f in schema}, schema=schema)


@dataclass(frozen=True)
class StageSpec:
    """How to build a stage inside each worker, and how its output is typed and counted."""

    name: str
    factory: Callable[[], RowStage]  # picklable; called once per actor
    schema: pa.Schema  # output schema of the stage
    config: dict[str, Any]  # settings that change the output (part of every shard fingerprint)
    extra_stats: Callable[[pa.Table], dict[str, int]] | None = None
    num_cpus: float = 1.0  # per actor; Dlib and the CPU backbone each use one core well
    num_gpus: float = 0.0  # per actor; the embedding stage asks for a GPU when configured


class ShardWorker:
    """Ray Data actor: builds the stage once, then turns whole input shards into output shards."""

    def __init__(self, spec: StageSpec, out: str, storage: StorageSettings) -> None:
        self.spec, self.storage = spec, storage
        self.stage = spec.factory()
        self.sink = io.ShardSink(out, storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for shard, source, fingerprint in zip(batch["shard"], batch["source"], batch["fingerprint"]):
            started = time.perf_counter()
            table = io.read_parquet(str(source), self.storage)
            read = time.perf_counter()
            parts = []
            for chunk in table.to_batches(max_chunksize=self.stage.BATCH_SIZE):
                parts.append(from_batch(self.stage(to_batch(pa.Table.from_batches([chunk]))), self.spec.schema))
            output = pa.concat_tables(parts) if parts else self.spec.schema.empty_table()
            extra = self.spec.extra_stats(output) if self.spec.extra_stats else None
            stats = shard_stats(str(shard), output, extra)
            computed = time.perf_counter()
            self.sink.write(str(shard), output, str(fingerprint), stats)
            log.info("%s: %s, %d rows: read %.2fs, %s %.2fs, write %.2fs", self.spec.name, shard, output.num_rows,
                     read - started, self.spec.name, computed - read, time.perf_counter() - computed)
            results.append(json.dumps(stats))
        return {"stats": np.array(results, dtype=object)}


def run_stage(spec: StageSpec, source: str, out: str, storage: StorageSettings, ray_settings: RaySettings) -> Summary:
    """Run `spec` over every finished shard of `source` into `out`; skip shards already done."""
    import ray

    from ferray.runtime import ensure_ray

    started = time.perf_counter()
    inputs = io.completed_shards(source, storage)
    knobs = json.dumps({"stage": spec.name, **spec.config}, sort_keys=True, default=str)
    sink = io.ShardSink(out, storage)
    summary = Summary(stage=spec.name, source=source, out=out)
    pending = []
    for uri in inputs:
        shard = uri.rsplit("/", 1)[-1][: -len(".parquet")]
        upstream = io.read_json(io.join(source, io.MARKERS, f"{shard}.json"), storage)["fingerprint"]
        fingerprint = hashlib.sha256(f"{upstream}\n{knobs}".encode()).hexdigest()
        done = sink.completed(shard, fingerprint)
        if done is None:
            pending.append({"shard": shard, "source": uri, "fingerprint": fingerprint})
        else:
            summary.add(done)
            summary.shards_skipped += 1
    log.info("%s: %d input shards, %d already done", spec.name, len(inputs), summary.shards_skipped)
    if pending:
        ensure_ray(ray_settings)
        workers = max(1, min(len(pending), _pool_size(spec)))
        results = (
            ray.data.from_items(pending, override_num_blocks=len(pending))
            .map_batches(
                ShardWorker,
                fn_constructor_kwargs={"spec": spec, "out": out, "storage": storage},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus or None,
            )
            .take_all()
        )
        for result in results:
            summary.add(json.loads(result["stats"]))
        summary.shards_written = len(results)
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _pool_size(spec: StageSpec) -> int:
    """Actors that fit the cluster at once: by CPUs, and by GPUs when the stage uses them."""
    import ray

    from ferray.runtime import cluster_cpus

    size = int(cluster_cpus() // max(spec.num_cpus, 1e-3))
    if spec.num_gpus:
        size = min(size, int(ray.cluster_resources().get("GPU", 0) // spec.num_gpus))
    if size < 1:
        raise RuntimeError(f"{spec.name}: the cluster cannot fit one worker ({spec.num_cpus} CPU, {spec.num_gpus} GPU)")
    return size
