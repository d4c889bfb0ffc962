"""Embedding throughput: the Ray stage (`ferray embed`) versus plain `model.predict`, same faces, same run.

Usage: .venv/bin/python bench/embed.py ALIGNED [--rows N] [--shard-rows 1024] [--cases lite0-48,b0-112] [--keep DIR]
ALIGNED is the output of `ferray align` (e.g. full FER-2013). For each backbone and size the bench
re-shards the first ROWS faces (default: every face), times `model.predict` in this process (model
already built), then times `ferray embed` on local Ray (all CPUs, one actor per CPU; wall time includes
actor start, TensorFlow import and model build, but not `ray.init`, which a cluster pays once and not per
stage), and prints both rates and their ratio. On a few thousand faces the fixed actor start-up
(≈ 6–8 s on 2 CPUs) dominates; an archive-sized input is what the stage is for. EfficientNet-B0 runs
with `weights: none` when Keras's ImageNet file is not cached (no internet here): throughput does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path


from ferray.model import embed
from ferray.data import io as fio
from ferray.model.backbones import BackboneWeightsError, build_backbone, resolve_weights
from ferray.config import load_settings
from ferray.runtime import ensure_ray
from ferray.executor import shard_stats

CASES = {"lite0-48": ("efficientnet-lite0", 48), "lite0-112": ("efficientnet-lite0", 112),
         "b0-48": ("efficientnet-b0", 48), "b0-112": ("efficientnet-b0", 112)}


def reshard(aligned: str, out: str, rows: int, shard_rows: int, storage) -> None:
    table = fio.read_table(fio.completed_shards(aligned, storage), storage)
    table = table.slice(0, rows) if rows else table
    sink = fio.ShardSink(out, storage)
    for index, start in enumerate(range(0, table.num_rows, shard_rows)):
        part = table.slice(start, shard_rows)
        name = f"part-{index:05d}"
        sink.write(name, part, f"bench-{name}", shard_stats(name, part))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("aligned")
    parser.add_argument("--rows", type=int, default=0, help="faces to embed (0: all)")
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--keep", help="keep each case's embedded shards in KEEP/<case> (for `ferray train`)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_settings(ray={"progress_bars": False})
    work = Path(tempfile.mkdtemp(prefix="ferray-bench-embed-"))
    source = str(work / "aligned")
    reshard(args.aligned, source, args.rows, args.shard_rows, base.storage)
    faces = embed.decode_faces(fio.read_table(fio.completed_shards(source, base.storage), base.storage, ["face"])["face"].to_pylist(),
                               base.faces.size, 1)
    ensure_ray(base.ray)
    for case in args.cases.split(","):
        name, size = CASES[case]
        backbone = base.backbone.model_copy(update={"name": name, "input_size": size})
        try:
            resolve_weights(backbone)
            note = ""
        except BackboneWeightsError:
            backbone = backbone.model_copy(update={"weights": "none"})
            note = " (weights: none, no ImageNet file cached)"
        settings = base.model_copy(update={"backbone": backbone})
        model = build_backbone(backbone, image_size=base.faces.size)
        model.predict(faces[:256], batch_size=backbone.batch_size, verbose=0)  # warm-up
        started = time.perf_counter()
        model.predict(faces, batch_size=backbone.batch_size, verbose=0)
        plain = len(faces) / (time.perf_counter() - started)
        out = str(work / f"embedded-{name}-{size}")
        started = time.perf_counter()
        summary = embed.run(settings, source, out)
        stage = summary.rows / (time.perf_counter() - started)
        print(f"{name} @ {size}px{note}: plain model.predict {plain:.0f} emb/s; ray stage {stage:.0f} emb/s "
              f"({summary.rows} faces, wall incl. actor start and model build); ratio {stage / plain:.2f}", flush=True)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.move(out, Path(args.keep) / case)
        else:
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
