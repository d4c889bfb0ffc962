"""The stage contract: what a shards-to-shards step declares, and the fingerprint of each shard it writes."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from ferray.config import StorageSettings
from ferray.data import io
from ferray.executor.summary import shard_stats

log = logging.getLogger(__name__)


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
