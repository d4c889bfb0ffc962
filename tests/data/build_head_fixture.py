"""Rebuild `fer2013-head.zip`: real FER-2013 faces for the head and training tests.

Run once by a developer (`python tests/data/build_head_fixture.py ../shared/datasets/fer2013.zip`);
the zip is committed. 40 Training, 20 PublicTest (val) and 10 PrivateTest (test) faces per class,
picked by a seeded shuffle, in the image release's layout. 280 training faces are enough for a head
on frozen Lite0 embeddings to reach about 30% on the 140 val faces (chance 14%), measured.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
PER_CLASS = {"Training": 40, "PublicTest": 20, "PrivateTest": 10}
SEED = 4


def pick(names: list[str]) -> list[str]:
    rng = np.random.default_rng(SEED)
    chosen = []
    for label in CLASSES:
        for prefix, count in PER_CLASS.items():
            folder = "train" if prefix == "Training" else "test"
            matching = sorted(n for n in names if n.startswith(f"{folder}/{label}/{prefix}_"))
            chosen += [matching[i] for i in sorted(rng.choice(len(matching), count, replace=False))]
    return sorted(chosen)


def main(source: str) -> None:
    with zipfile.ZipFile(source) as archive:
        members = pick([n for n in archive.namelist() if n.endswith(".jpg")])
        with zipfile.ZipFile(HERE / "fer2013-head.zip", "w", zipfile.ZIP_STORED) as out:
            for name in members:
                # Fixed timestamps keep the zip byte-identical across rebuilds.
                out.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), archive.read(name))
    print(f"wrote {len(members)} faces to {HERE / 'fer2013-head.zip'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared" / "datasets" / "fer2013.zip"))
