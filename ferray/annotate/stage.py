"""The annotate stage on the executor: detect and label parts, their actor pools, shard stats."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ferray import executor
from ferray.annotate.detect import FaceFinder
from ferray.annotate.job import Job
from ferray.annotate.label import Labeller
from ferray.annotate.media import Unit, UnitKey, for_actors, pack, shard_identity
from ferray.config import AnnotateSettings
from ferray.data.schema import ANNOTATION_SCHEMA, LABELS, STATUS_OK
from ferray.errors import InputError
from ferray.executor import Part, Pools, Resources, ShardUnit, Stage, shard_stats
from ferray.executor.ledger import entry
from ferray.faces.align import NO_FACE

log = logging.getLogger(__name__)


def annotation_stats(shard: str, table: pa.Table, units: list[Unit] | tuple[UnitKey, ...], job_key: str,
                     version: str, counters: dict[str, float]) -> dict[str, Any]:
    """`_stats/<shard>.json`: counts by status and class, no-face rate, mean confidence, and its units."""
    statuses = table["status"].to_pylist()
    ok = pc.equal(table["status"], STATUS_OK)
    faces, no_face = statuses.count(STATUS_OK), statuses.count(NO_FACE)
    framed = {(u, f) for u, f, s in zip(table["unit"].to_pylist(), table["frame_index"].to_pylist(), statuses)
              if s in (STATUS_OK, NO_FACE)}
    confidence = float(pc.sum(table["confidence"].filter(ok)).as_py() or 0.0)
    keys = [unit.key if isinstance(unit, Unit) else tuple(unit) for unit in units]
    extra = {
        "units": len(keys),
        "frames": len(framed),
        "faces": faces,
        "no_face": no_face,
        "confidence_sum": confidence,
        "video_seconds": float(counters.get("video_seconds", 0.0)),
    }
    stats = shard_stats(shard, table, extra)
    mix = Counter(table["label_name"].filter(ok).to_pylist())
    stats.update(entry(job_key, keys))
    stats.update({
        "model_version": version,
        "no_face_rate": no_face / len(framed) if framed else None,
        "mean_confidence": confidence / faces if faces else None,
        "class_mix": {name: mix[name] / faces for name in LABELS} if faces else {},
    })
    return stats


class Detect(Part):
    """Units -> draft rows with raw chips (CPU; Dlib models and the SOURCE tree opened once per actor)."""

    resources = Resources(num_cpus=1.0, tasks_per_actor=2)

    def __init__(self, job: Job, resources: Resources) -> None:
        self.job, self.resources = job, resources
        self.finder: FaceFinder | None = None

    def setup(self) -> None:
        self.finder = FaceFinder(self.job)

    def __call__(self, payload: Any, table: pa.Table | None, extra: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        assert self.finder is not None
        return self.finder.find(payload)


class Label(Part):
    """Draft rows -> annotation rows (the Keras model loaded once per actor, on its GPU when it has one)."""

    def __init__(self, job: Job, resources: Resources) -> None:
        self.job, self.resources = job, resources
        self.labeller: Labeller | None = None

    def setup(self) -> None:
        self.labeller = Labeller(self.job)

    def __call__(self, payload: Any, table: pa.Table | None, extra: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        assert self.labeller is not None and table is not None
        return self.labeller(table), extra


class AnnotateStage(Stage):
    """Detection then labelling of packed media units; a shard's stats carry its units (the ledger)."""

    name = "annotate"
    version = 1
    schema = ANNOTATION_SCHEMA

    def __init__(self, job: Job, actors: Actors) -> None:
        settings = job.settings
        # Two shards queued per actor: the next is at hand when one ends, and no actor holds a backlog
        # while another has run dry.
        self.resources = Resources(settings.num_cpus, settings.num_gpus, pool_size=actors.detect, tasks_per_actor=2)
        self.detect = Detect(job, Resources(1.0, pool_size=actors.detect, tasks_per_actor=2))
        self.label = Label(job, Resources(actors.label_cpus, settings.num_gpus, pool_size=actors.label, tasks_per_actor=2))
        self.job = job

    def parts(self) -> tuple[Part, ...]:
        return (self.detect, self.label)

    def stats(self, shard: str, table: pa.Table, payload: Any, extra: dict[str, Any]) -> dict[str, Any]:
        return annotation_stats(shard, table, payload, self.job.run_key, self.job.model.version, extra)


def _pools(settings: AnnotateSettings) -> str:
    """`auto`: classification in its own actors where it needs them (a GPU share; TensorFlow started once
    for the Keras runtime), else in the detect actors: LiteRT adds ~2 CPU-s to an actor's start, and rows
    then never leave it (docs/benchmarks-annotate.md)."""
    if settings.pools != "auto":
        return settings.pools
    return "split" if settings.num_gpus or settings.runtime == "keras" else "fused"


@dataclass(frozen=True)
class Actors:
    """How many actors of each kind a run starts (`fused`: `detect` actors that also classify)."""

    pools: str
    detect: int
    label: int
    label_cpus: float


def plan_actors(settings: AnnotateSettings, cpus: int, gpus: float) -> Actors:
    """Actor counts for the cluster: detection on every CPU; classification on GPUs, or on one actor
    per `label_every` CPUs that holds no CPU (a tenth of the work, TensorFlow loaded once)."""
    if settings.num_gpus and gpus < settings.num_gpus:
        raise InputError(f"annotate.num_gpus={settings.num_gpus} but the cluster has {gpus:g} GPUs")
    pools = _pools(settings)
    if pools == "fused":
        size = max(1, int(cpus // settings.num_cpus))
        if settings.num_gpus:
            size = min(size, max(1, int(gpus // settings.num_gpus)))
        return Actors(pools, size, 0, settings.num_cpus)
    if settings.num_gpus:
        labellers = max(1, int(gpus // settings.num_gpus))
        return Actors(pools, max(1, int(cpus - labellers * settings.num_cpus)), labellers, settings.num_cpus)
    return Actors(pools, cpus, max(1, math.ceil(cpus / settings.label_every)), 0.0)


def shards(job: Job, units: list[Unit], listed: int, ray_settings: Any) -> tuple[AnnotateStage, list[ShardUnit], Pools]:
    """The stage and the shards the units (of a SOURCE listing `listed` files) pack into, sized for
    the cluster's actors (Ray starts here, to count them)."""
    from ferray.runtime import ensure_ray

    ensure_ray(ray_settings)
    cpus, gpus = executor.cluster()
    actors = plan_actors(job.settings, cpus, gpus)
    stage = AnnotateStage(job, actors)
    packed = pack(units, for_actors(listed, job.settings, actors.detect))
    log.info("annotate: %d units in %d shards on %s", len(units), len(packed),
             f"{min(len(packed), actors.detect)} fused actors" if actors.pools == "fused" else
             f"{min(len(packed), actors.detect)} detect actors and {min(len(packed), actors.label)} classify actors")
    return stage, [ShardUnit(*shard_identity(job.run_key, shard), shard) for shard in packed], actors.pools  # type: ignore[return-value]
