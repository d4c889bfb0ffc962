"""CPU ms a face of each LiteRT graph of a model at several batch sizes: what `ferray.model.lite.BATCH` is
chosen from.

Usage:
  .venv/bin/python bench/lite_batch.py [MODEL] ALIGNED [--sizes 1 4 8 16 32 64 256] [--faces 1024] [--repeats 3]

MODEL (default `default`): an artifact, or an ensemble whose ferray.json names a cascade (then every graph
the cascade may run: each member at int8 and float32). One thread, the first `--faces` val faces of ALIGNED,
each graph run as annotate runs it (`LiteModel.raw`); a figure is `cascade.cpu_ms`, the least of `--repeats`
passes in thread CPU time after a warm-up, so the machine's other load counts little.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ferray.annotate.job import resolve_model
from ferray.config import StorageSettings, load_settings
from ferray.model import artifact, cascade, lite
from ferray.model.ensemble import MEMBER_PREFIX
from ferray.training import tune

log = logging.getLogger("bench.lite_batch")


def graphs(model_uri: str, storage: object) -> dict[str, str]:
    """Name -> path of every graph annotate may run for the model."""
    _, meta = artifact.read_meta(model_uri, storage)  # type: ignore[arg-type]
    chosen = cascade.Cascade.from_meta(meta)
    if chosen is None:
        precision = meta.get("inference", {}).get("lite_precision", "float32")
        precision = "float32" if precision in ("auto", "cascade") else precision
        return {precision: lite.export(model_uri, storage, precision)}  # type: ignore[arg-type]
    members = len(meta.get("members") or [])
    return {f"{MEMBER_PREFIX}{k}:{p}": lite.export(f"{model_uri}#{MEMBER_PREFIX}{k}", storage, p)  # type: ignore[arg-type]
            for k in range(members) for p in cascade.PASS_PRECISIONS}


def cpu_ms(path: str, faces: np.ndarray, sizes: list[int], repeats: int) -> dict[int, float]:
    """CPU ms a face of the graph at `path` run as annotate runs it (`LiteModel.raw`), in batches of each size."""
    graph = lite.LiteModel(path, {}, StorageSettings(), threads=1)
    return {size: cascade.cpu_ms(lambda x, size=size: graph.raw(x, size), faces, len(faces), repeats) for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="default")
    parser.add_argument("aligned")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256])
    parser.add_argument("--faces", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    settings = load_settings()
    storage = settings.storage.resolved()
    ref = resolve_model(args.model, storage)
    faces, _, _ = tune.load_faces(args.aligned, storage, ref.face_size, 1 if ref.face_color == "gray" else 3)
    x = np.ascontiguousarray(faces["val"].x[: args.faces], np.float32)
    print("graph | " + " | ".join(f"batch {s}" for s in args.sizes))
    for name, path in graphs(ref.uri, storage).items():
        got = cpu_ms(path, x, args.sizes, args.repeats)
        print(f"{name} | " + " | ".join(f"{got[s]:.3f}" for s in args.sizes), flush=True)


if __name__ == "__main__":
    main()
