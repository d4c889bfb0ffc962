"""Rebuild `fer2013-holdout.zip`: more real FER-2013 test faces for the retrain gate's holdout.

Run once by a developer (`python tests/data/build_retrain_fixture.py ../shared/datasets/fer2013.zip`);
the zip is committed. 30 PrivateTest faces per class that `fer2013-head.zip` does not hold (disgust
has 34 left that qualify), picked by a seeded shuffle, in the image release's layout. Unpacked over
`fer2013-head.zip`, the test split grows from 10 to 40 faces a class, so the gate in
tests/test_retrain.py compares two models on 280 faces instead of 70: one face is 0.36 points
rather than 1.4. Faces with a byte-identical copy anywhere in FER-2013 (`fer2013_duplicates.txt`)
are left out: a copy in `train/` would let a model score a holdout face it was fitted on.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
PER_CLASS = 30
SEED = 5


def duplicated(listing: Path) -> set[str]:
    """Every path that belongs to a group of byte-identical files."""
    if not listing.is_file():
        raise SystemExit(f"need {listing} to leave duplicated faces out")
    lines = [line.lstrip("!") for line in listing.read_text().splitlines() if line and not line.startswith("#")]
    return {path for line in lines for path in line.split("\t")}


def pick(names: list[str], taken: set[str], duplicates: set[str]) -> list[str]:
    rng = np.random.default_rng(SEED)
    chosen = []
    for label in CLASSES:
        matching = sorted(n for n in names if n.startswith(f"test/{label}/PrivateTest_")
                          and n not in taken and n not in duplicates)
        chosen += [matching[i] for i in sorted(rng.choice(len(matching), PER_CLASS, replace=False))]
    return sorted(chosen)


def main(source: str) -> None:
    with zipfile.ZipFile(HERE / "fer2013-head.zip") as head:
        taken = set(head.namelist())
    duplicates = duplicated(Path(source).with_name("fer2013_duplicates.txt"))
    with zipfile.ZipFile(source) as archive:
        members = pick([n for n in archive.namelist() if n.endswith(".jpg")], taken, duplicates)
        with zipfile.ZipFile(HERE / "fer2013-holdout.zip", "w", zipfile.ZIP_STORED) as out:
            for name in members:
                # Fixed timestamps keep the zip byte-identical across rebuilds.
                out.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), archive.read(name))
    print(f"wrote {len(members)} faces to {HERE / 'fer2013-holdout.zip'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared" / "datasets" / "fer2013.zip"))
