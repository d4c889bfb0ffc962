"""The one shard executor: plan units -> skip done -> Ray Data -> sink (ok, _quarantine, _stats, marker) -> summary.

Every command that turns shards into shards (ingest, align, embed, annotate) is a `Stage` run here. A
stage declares its name, version, output schema and resources, and one or more `Part`s: built once per
Ray actor (`setup()`), then called on each shard's work. The executor fingerprints every output shard
with the stage's name, version and schema on top of the stage's own key, so a changed stage redoes
exactly its shards; it writes a shard's rows, quarantine, stats and, last, its marker.

- `stage`: the contract (Stage, Part, RowStage, Resources, ShardUnit, fingerprint).
- `pools`: the run on Ray Data, one pool of actors holding every part (`fused`) or a pool per part (`split`).
- `ledger`: the option for stages that pack units into shards at run time (annotate): finished units
  read back from OUT, pruning of changed inputs, superseding of other run keys.
- `summary`: per-shard stats and the run's one-screen summary.
"""

from ferray.executor.pools import Pools, cluster, execute, item, pending, pool_size, run
from ferray.executor.stage import Part, Resources, RowStage, ShardUnit, Stage, fingerprint, upstream_units
from ferray.executor.summary import Summary, shard_stats, write_meta

__all__ = [
    "Part", "Pools", "Resources", "RowStage", "ShardUnit", "Stage", "Summary", "cluster", "execute", "fingerprint",
    "item", "pending", "pool_size", "run", "shard_stats", "upstream_units", "write_meta",
]
