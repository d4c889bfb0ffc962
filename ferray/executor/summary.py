"""What a stage run did: per-shard stats (`_stats/<shard>.json`) and the run's one-screen summary."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ferray.config import StorageSettings
from ferray.data import io
from ferray.data.schema import LABELS, STATUS_OK


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


def write_meta(out: str, summary: Summary, settings: Any, storage: StorageSettings, **more: Any) -> None:
    """`OUT/_ferray/<stage>.json`: the run's summary and its settings (secrets masked)."""
    io.write_json(io.join(out, io.META, f"{summary.stage}.json"),
                  {**more, "summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
