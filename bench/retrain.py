"""The retrain gate on full FER-2013: an honest retrain is promoted, one with shuffled labels rejected.

Usage: .venv/bin/python bench/retrain.py WORKDIR [--source ../shared/datasets/fer2013.zip] [--epochs 20]
       [--registry URI] [--seed 0]

Run 1 retrains on SOURCE into a fresh registry (WORKDIR/registries/<time>, unless --registry): no
current model, so it is promoted. Run 2 retrains on a copy of SOURCE whose `train/` labels are
permuted (every Training face moved to the class folder of another, seeded; class counts kept) and
whose `test/` is untouched, so both runs are gated on the same holdout: FER-2013's test split
(PrivateTest). It must be rejected. Both runs share WORKDIR's caches under the same dataset name, as
a scheduled job sees one prefix whose contents changed: run 2 redoes only the shards holding moved
files, and a second bench run reuses everything. Prints both decisions and scores; exits 1 when
the decisions are not (promoted, rejected).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "fer2013.zip"
DATASET = "fer2013"


def shuffled_copy(source: Path, out: Path, seed: int) -> Path:
    """SOURCE with its `train/<class>/` labels permuted; written once per seed, then reused."""
    if out.is_file():
        return out
    with zipfile.ZipFile(source) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
        train = [n for n in names if n.split("/", 1)[0] == "train"]
        labels = np.random.default_rng(seed).permutation([n.split("/")[1] for n in train])
        renamed = {name: f"train/{label}/{name.rsplit('/', 1)[-1]}" for name, label in zip(train, labels)}
        partial = out.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as copy:
            for name in names:
                copy.writestr(zipfile.ZipInfo(renamed.get(name, name), date_time=(2020, 1, 1, 0, 0, 0)),
                              archive.read(name))
    partial.rename(out)  # whole or absent: a killed bench never leaves half a zip to be reused
    moved = sum(1 for name, new in renamed.items() if name != new)
    print(f"wrote {out}: {len(train)} train faces, {moved} moved to another class, test/ as is")
    return out


def retrain_once(workdir: str, source: Path, registry: str, epochs: int, workers: int) -> dict:
    from ferray import retrain
    from ferray.config import load_settings

    settings = load_settings(
        pipeline={"workdir": workdir, "train": {"dataset": DATASET, "source": str(source), "name": DATASET}},
        train={"epochs": epochs, "workers": workers},
        retrain={"registry": registry},
        ray={"progress_bars": False},
    )
    began = time.perf_counter()
    summary = retrain.run(settings).to_dict()
    summary["wall"] = time.perf_counter() - began
    return summary


def describe(name: str, run: dict) -> str:
    verdict = "PROMOTED" if run["promoted"] else "REJECTED"
    candidate, current = run["candidate"], run["current"]
    scores = f"accuracy {100 * candidate['accuracy']:.2f}%, macro-F1 {100 * candidate['macro_f1']:.2f}%"
    if current:
        scores += (f"; current {current['version']}: accuracy {100 * current['accuracy']:.2f}%, "
                   f"macro-F1 {100 * current['macro_f1']:.2f}%")
    return (f"{name}: {verdict} {run['version']} in {run['wall']:.0f} s wall; {scores}; "
            f"holdout {run['holdout']['dataset']} {run['holdout']['split']} ({run['holdout']['rows']} rows); {run['reason']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="pipeline workdir: caches of ingest, align, embed, models, reports")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="FER-2013 image-release zip")
    parser.add_argument("--epochs", type=int, default=20, help="head epochs per retrain (paper: 100)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--registry", help="registry URI (default: a fresh WORKDIR/registries/<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label permutation")
    args = parser.parse_args()
    if not args.source.is_file():
        sys.exit(f"no FER-2013 zip at {args.source} (pass --source)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The per-stage lines (rows/s) and the decisions; Ray's and TensorFlow's chatter stays out.
    logging.getLogger("ferray").setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    registry = args.registry or str(workdir / "registries" / stamp)
    shuffled = shuffled_copy(args.source.resolve(), workdir / f"fer2013-train-shuffled-{args.seed}.zip", args.seed)

    honest = retrain_once(str(workdir), args.source.resolve(), registry, args.epochs, args.workers)
    sabotaged = retrain_once(str(workdir), shuffled, registry, args.epochs, args.workers)
    print(describe("honest  ", honest))
    print(describe("shuffled", sabotaged))
    print(f"registry: {registry} (decisions/ holds both records)")
    if not (honest["promoted"] and not sabotaged["promoted"]):
        sys.exit("unexpected: the honest retrain must be promoted and the shuffled one rejected")


if __name__ == "__main__":
    main()
