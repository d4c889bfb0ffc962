"""Paper recipe on cached FER-2013 embeddings with 1 and 2 Ray Train workers: wall, s/epoch, accuracy.

Usage: .venv/bin/python bench/train.py EMBEDDED [--epochs 100] [--workers 1 2] [--batch-size N]
EMBEDDED is the output of `ferray embed` over FER-2013 (local folder or s3://). Prints one line per
worker count; the PrivateTest figure is the `test` split (FER-2013's official test set).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

HOW_TO_MAKE = """no embedded shards at {path}. Make them once from the shared FER-2013 zip:
  .venv/bin/ferray ingest fer2013 ../shared/datasets/fer2013.zip out/fer2013/ingested
  .venv/bin/ferray align out/fer2013/ingested out/fer2013/aligned
  .venv/bin/ferray embed out/fer2013/aligned out/fer2013/embedded
then: .venv/bin/python bench/train.py out/fer2013/embedded"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embedded")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the train section's)")
    parser.add_argument("--hidden", type=int, default=None, help="head width (default: the head section's)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="default: the cluster's CPUs shared evenly, so 1 and 2 workers get the same machine")
    parser.add_argument("--keep", help="write models under this folder and keep them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from ferray.data import io
    from ferray.training import train
    from ferray.config import load_settings
    from ferray.config import HeadSettings, TrainSettings
    from ferray.runtime import ensure_ray

    settings = load_settings(ray={"progress_bars": False})
    storage = settings.storage.resolved()
    try:
        io.completed_shards(args.embedded, storage)
    except io.StorageError:
        sys.exit(HOW_TO_MAKE.format(path=args.embedded))
    head_settings = HeadSettings(**({"hidden": args.hidden} if args.hidden else {}))
    out = args.keep or tempfile.mkdtemp(prefix="ferray-bench-train-")
    started = time.perf_counter()
    import ray

    # Workers' logs stay in Ray's log folder; the bench prints its figures only.
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ensure_ray(settings.ray)
    print(f"ray up in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs on this machine")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for workers in args.workers:
        recipe = TrainSettings(
            workers=workers,
            cpus_per_worker=args.cpus_per_worker or max(1, cpus // workers),
            epochs=args.epochs,
            max_failures=0,
            # A fresh run each time: the bench measures training, not resuming a finished run.
            run_name=f"bench-{workers}w-{int(time.time())}",
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        model_out = io.join(out, f"{workers}-workers")
        began = time.perf_counter()
        result = train.run(settings, args.embedded, model_out, head_settings=head_settings, train=recipe)
        wall = time.perf_counter() - began
        history = io.read_json(io.join(model_out, train.HISTORY_FILE), storage)
        epoch_seconds = sum(row["seconds"] for row in history)
        print(
            f"{workers} worker(s): {result.epochs_run} epochs in {wall:.1f} s wall "
            f"({epoch_seconds:.1f} s in epochs, {epoch_seconds / len(history):.2f} s/epoch median "
            f"{result.seconds_per_epoch:.2f}; the rest is start-up, data and reports), "
            f"{recipe.cpus_per_worker:g} CPU(s) each, batch {recipe.batch_size}, hidden {head_settings.hidden}, "
            f"rows {result.rows}, best epoch {result.best_epoch}, "
            f"val (PublicTest) {result.val_accuracy:.4f}, PrivateTest {result.test_accuracy:.4f}"
        )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
