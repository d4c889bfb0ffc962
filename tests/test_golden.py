"""Before/after: ingest, align, embed and annotate give the rows that the code before the refactor gave (tests/data/golden/)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from golden import GOLDEN, assert_same, snapshot
from test_video import build_media

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def test_rows_equal_the_golden_outputs(tmp_path: Path) -> None:
    media = tmp_path / "media" / "archive"
    build_media(media)
    tables = snapshot(tmp_path / "out", media)
    assert sorted(tables) == sorted(p.stem for p in GOLDEN.glob("*.parquet"))
    for name, table in tables.items():
        assert_same(name, table, pq.read_table(GOLDEN / f"{name}.parquet"))
