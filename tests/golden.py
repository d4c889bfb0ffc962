"""Before/after equality: run ingest, align, embed and annotate through the CLI on tests/data, and reduce
their outputs to compact tables (ids, statuses, labels, face hashes, embeddings, probabilities).

Only the product's outside is used (the `ferray` command line, the Parquet files it writes), so the
same code snapshots any version of ferray: `tests/data/build_golden.py` stored the tables of the code
before the refactor into role packages (main at 5d20467: 165cf3d plus face tracks) in
`tests/data/golden/`, and `tests/test_golden.py` compares today's code with them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import DATA, SAMPLE_ZIP

GOLDEN = DATA / "golden"
# Every reader, on the tiny real samples in tests/data.
INGEST_SOURCES = {
    "fer2013": SAMPLE_ZIP,
    "fer2013-csv": DATA / "fer2013-csv",
    "rafdb": DATA / "rafdb",
    "ckplus48": DATA / "ckplus48",
    "ckplus-full": DATA / "ckplus-full",
    "jaffe": DATA / "jaffe",
    "folder": DATA / "faces",
}
DATASET_OF = {"ckplus48": "ckplus", "ckplus-full": "ckplus"}
# Aligned: the photos with real detection (RAF-DB, JAFFE, CK+ full) and the pre-cropped FER-2013 faces.
ALIGN_INPUTS = ("fer2013", "rafdb", "jaffe", "ckplus-full")
# The detector and runtime the golden rows were made with (HOG and Keras, then the only ones).
ANNOTATE_CONFIG = ("ray:\n  progress_bars: false\nfaces:\n  detector: hog\n"
                   "annotate:\n  segment_seconds: 1.0\n  shard_frames: 8\n  runtime: keras\n")


def _digest(value: bytes | None) -> str | None:
    return None if value is None else hashlib.sha256(value).hexdigest()[:20]


def _rows(out: Path) -> pa.Table:
    """Every row of a stage output: ok shards and quarantine together."""
    files = sorted(out.glob("*.parquet")) + sorted((out / "_quarantine").glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def _relative(paths: list[str | None], root: Path) -> list[str | None]:
    """source_path without the checkout it ran in (a zip member keeps its `archive.zip/member` form)."""
    prefix = str(root).rstrip("/") + "/"
    return [p[len(prefix):] if p and p.startswith(prefix) else p for p in paths]


def _sorted(columns: dict[str, list], key: str = "id") -> pa.Table:
    table = pa.table(columns)
    return table.sort_by([(key, "ascending")])


def _ingest_table(out: Path) -> dict[str, list]:
    rows = _rows(out)
    return {
        "id": rows["id"].to_pylist(),
        "dataset": rows["dataset"].to_pylist(),
        "split": rows["split"].to_pylist(),
        "source_path": _relative(rows["source_path"].to_pylist(), DATA.parent.parent),
        "label": rows["label"].to_pylist(),
        "label_name": rows["label_name"].to_pylist(),
        "image_sha": [_digest(v) for v in rows["image"].to_pylist()],
        "status": rows["status"].to_pylist(),
        "error": rows["error"].to_pylist(),
    }


def _align_table(out: Path) -> dict[str, list]:
    rows = _rows(out)
    return {
        "id": rows["id"].to_pylist(),
        "split": rows["split"].to_pylist(),
        "label": rows["label"].to_pylist(),
        "status": rows["status"].to_pylist(),
        "error": rows["error"].to_pylist(),
        "face_sha": [_digest(v) for v in rows["face"].to_pylist()],
        "bbox": rows["bbox"].to_pylist(),
        "face_source": rows["face_source"].to_pylist(),
        "faces_found": rows["faces_found"].to_pylist(),
    }


def snapshot(work: Path, media_root: Path) -> dict[str, pa.Table]:
    """Run the four stages into `work` and return one compact table per stage output.

    Annotation uses the shipped `default` model: a model trained in the test session is not bit-for-bit
    the same in two processes. When the shipped model changes, rebuild the golden files with the
    reference code and the new model (tests/data/build_golden.py).
    """
    from ferray.cli import main

    tables: dict[str, pa.Table] = {}
    ingested: list[pa.Table] = []
    aligned: list[pa.Table] = []
    for name, source in INGEST_SOURCES.items():
        out = work / "ingest" / name
        assert main(["ingest", DATASET_OF.get(name, name), str(source), str(out)]) == 0
        ingested.append(_sorted(_ingest_table(out)))
        if name in ALIGN_INPUTS:
            assert main(["align", str(out), str(work / "align" / name)]) == 0
            aligned.append(_sorted(_align_table(work / "align" / name)))
    tables["ingest"] = pa.concat_tables(ingested, promote_options="permissive")
    tables["align"] = pa.concat_tables(aligned, promote_options="permissive")

    assert main(["embed", str(work / "align" / "fer2013"), str(work / "embed")]) == 0
    rows = _rows(work / "embed")
    tables["embed"] = _sorted({
        "id": rows["id"].to_pylist(),
        "status": rows["status"].to_pylist(),
        "face_sha": [_digest(v) for v in rows["face"].to_pylist()],
        "embedding": pa.array(rows["embedding"].to_pylist(), pa.list_(pa.float32())),
        "backbone": rows["backbone"].to_pylist(),
    })

    config = work / "annotate.yaml"
    config.write_text(ANNOTATE_CONFIG)
    out = work / "annotate"
    assert main(["annotate", "default", str(media_root), str(out), "--config", str(config)]) == 0
    rows = _rows(out)
    tables["annotate"] = _sorted({
        "id": rows["id"].to_pylist(),
        "unit": rows["unit"].to_pylist(),
        "source_path": _relative(rows["source_path"].to_pylist(), media_root),
        "media_type": rows["media_type"].to_pylist(),
        "frame_index": rows["frame_index"].to_pylist(),
        "timestamp_s": rows["timestamp_s"].to_pylist(),
        "face_index": rows["face_index"].to_pylist(),
        "faces_found": rows["faces_found"].to_pylist(),
        "bbox": rows["bbox"].to_pylist(),
        "label": rows["label"].to_pylist(),
        "label_name": rows["label_name"].to_pylist(),
        "confidence": pa.array(rows["confidence"].to_pylist(), pa.float32()),
        "probs": pa.array(rows["probs"].to_pylist(), pa.list_(pa.float32())),
        "status": rows["status"].to_pylist(),
        "error": rows["error"].to_pylist(),
        # Face tracks (filled once a video is done): the person and the smoothed label.
        "track_id": rows["track_id"].to_pylist(),
        "smoothed_label": rows["smoothed_label"].to_pylist(),
    })
    videos = [pq.read_table(f) for f in sorted((out / "videos").rglob("*.parquet"))]
    summary = pa.concat_tables(videos, promote_options="permissive")
    keep = [n for n in summary.schema.names if n not in ("source_path", "model_version", "timeline", "tracks_timeline")]
    tables["videos"] = pa.table({"source_path": _relative(summary["source_path"].to_pylist(), media_root),
                                 **{n: summary[n] for n in keep}}).sort_by("source_path")
    return tables


def assert_same(name: str, got: pa.Table, want: pa.Table, atol: float = 1e-4) -> None:
    """Exact equality of every column but floats, which agree within `atol`."""
    assert got.schema.names == want.schema.names, f"{name}: columns {got.schema.names} != {want.schema.names}"
    assert got.num_rows == want.num_rows, f"{name}: {got.num_rows} rows, golden has {want.num_rows}"
    for column in want.schema.names:
        kind = want.schema.field(column).type
        is_float = pa.types.is_floating(kind) or (pa.types.is_list(kind) and pa.types.is_floating(kind.value_type))
        if not is_float:
            mismatched = [(i, a, b) for i, (a, b) in enumerate(zip(got[column].to_pylist(), want[column].to_pylist()))
                          if a != b]
            assert not mismatched, f"{name}.{column}: {len(mismatched)} rows differ, first {mismatched[:3]}"
            continue
        for i, (a, b) in enumerate(zip(got[column].to_pylist(), want[column].to_pylist())):
            assert (a is None) == (b is None), f"{name}.{column} row {i}: {a} vs {b}"
            if a is not None:
                np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=atol,
                                           err_msg=f"{name}.{column} row {i}")
