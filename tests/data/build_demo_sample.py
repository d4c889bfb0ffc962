"""Rebuild `ferray/assets/fer2013-privatetest-350.zip`, the labelled sample `ferray demo` scores the shipped model on.

Run once by a developer (`python tests/data/build_demo_sample.py ../shared/datasets/fer2013.zip`); the
zip is committed, so the demo and the suite work on a fresh clone without the shared data.

350 FER-2013 PrivateTest faces (the official test split, the one docs/model-card.md reports on), drawn
at random with a fixed seed, stratified so that each class keeps its PrivateTest share (largest
remainder). Nothing is excluded: PrivateTest's duplicates and label noise stay in, as they are in the
full-split figures the demo prints beside it. Files keep their release names and bytes, in the
image-folder layout `test/<class>/PrivateTest_<n>.jpg`, so `ferray ingest fer2013` reads it as is.
"""

from __future__ import annotations

import random
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "ferray" / "assets"
TARGET = ASSETS / "fer2013-privatetest-350.zip"
SIZE = 350
SEED = 2013


def stratified(by_class: dict[str, list[str]], size: int, seed: int) -> list[str]:
    """`size` members, each class's count proportional to its share (largest remainder), drawn at random."""
    total = sum(len(names) for names in by_class.values())
    exact = {label: size * len(names) / total for label, names in by_class.items()}
    counts = {label: int(share) for label, share in exact.items()}
    for label in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: size - sum(counts.values())]:
        counts[label] += 1
    rng = random.Random(seed)
    return sorted(name for label in sorted(by_class) for name in rng.sample(sorted(by_class[label]), counts[label]))


def main(zip_path: str) -> None:
    with zipfile.ZipFile(zip_path) as source:
        by_class: dict[str, list[str]] = defaultdict(list)
        for name in source.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[2].startswith("PrivateTest_"):
                by_class[parts[1]].append(name)
        chosen = stratified(by_class, SIZE, SEED)
        # Stored, not deflated: JPEGs do not shrink, and a stored member reads without inflating.
        with zipfile.ZipFile(TARGET, "w", zipfile.ZIP_STORED) as out:
            for name in chosen:
                out.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), source.read(name))
    counts = {label: sum(n.split("/")[1] == label for n in chosen) for label in sorted(by_class)}
    print(f"{TARGET}: {len(chosen)} faces, {TARGET.stat().st_size:,} bytes, {counts}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[3] / "shared/datasets/fer2013.zip"))
