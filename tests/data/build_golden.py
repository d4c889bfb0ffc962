"""Write tests/data/golden/: the compact outputs of ingest, align, embed and annotate (tests/golden.py).

Run once with the code to compare against first on the path (the golden files hold the rows of main at
5d20467, the last commit before the refactor into role packages):
    git worktree add /tmp/refmain 5d20467
    cd /tmp && PYTHONPATH=/tmp/refmain:/path/to/ferray/tests python /path/to/ferray/tests/data/build_golden.py
(run outside the checkout, so that `ferray` is the reference's). Annotation uses the shipped `default`
model; if it changes, copy the new ferray/assets/default-model/ into the reference tree first. The reference
predates `annotate.runtime` (Keras was its only runtime): drop that line of tests/golden.py's ANNOTATE_CONFIG there.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq


def main() -> None:
    from golden import GOLDEN, snapshot
    from test_video import build_media

    import ferray

    logging.basicConfig(level=logging.WARNING)
    print(f"snapshot of {ferray.__file__}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        media = work / "media" / "archive"
        build_media(media)
        tables = snapshot(work / "out", media)
    GOLDEN.mkdir(exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, GOLDEN / f"{name}.parquet", compression="zstd")
        print(f"{name}: {table.num_rows} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
