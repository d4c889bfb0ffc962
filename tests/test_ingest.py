"""`ferray ingest` end to end on local Ray: conservation, S3 round trips, bad files, reruns."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from conftest import FER2013_ZIP, SAMPLE_ZIP
from ferray import executor
from ferray.data import ingest
from ferray.data import io as fio
from ferray.cli import main
from ferray.config import Settings, StorageSettings

pytestmark = pytest.mark.usefixtures("ray_session")


def outputs(out: str, storage: StorageSettings) -> tuple[pa.Table, pa.Table]:
    """(ok rows, quarantined rows) of a finished output, sorted by id."""
    fs, path = fio.url_to_fs(out, storage)
    data = fio.read_table(fio.completed_shards(out, storage), storage)
    quarantine_dir = fio.join(path, fio.QUARANTINE)
    quarantined = [f"s3://{p}" if out.startswith("s3://") else p for p in fs.ls(quarantine_dir)] if fs.exists(quarantine_dir) else []
    bad = fio.read_table(quarantined, storage) if quarantined else data.schema.empty_table()
    return data.sort_by("id"), bad.sort_by("id")


def assert_conserved(summary: executor.Summary, out: str, storage: StorageSettings, rows_in: int) -> tuple[pa.Table, pa.Table]:
    good, bad = outputs(out, storage)
    assert good.num_rows + bad.num_rows == rows_in == summary.rows
    assert set(good["status"].to_pylist()) <= {"ok"}
    assert "ok" not in bad["status"].to_pylist()
    stats = fio.read_stats(out, storage)
    assert sum(s["rows"] for s in stats) == rows_in
    assert sum(Counter(s["by_status"]).total() for s in stats) == rows_in
    assert len(set(good["id"].to_pylist() + bad["id"].to_pylist())) == rows_in, "ids must be unique"
    return good, bad


def test_sample_ingest_local(tmp_path: Path, settings: Settings) -> None:
    out = str(tmp_path / "out")
    summary = ingest.run(settings, "fer2013", str(SAMPLE_ZIP), out)
    good, _ = assert_conserved(summary, out, settings.storage, 35)
    assert summary.by_split_label["train"]["happy"] == 3
    first = good.slice(0, 1).to_pylist()[0]
    assert Image.open(io.BytesIO(first["image"])).size == (48, 48)
    assert set(good.schema.names) == {"id", "dataset", "split", "source_path", "label", "label_name", "image", "status", "error"}
    assert good.schema.field("label").type == pa.int8()


def test_rerun_writes_nothing_and_reports_skips(tmp_path: Path, settings: Settings) -> None:
    out = tmp_path / "out"
    small = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"shard_rows": 10})})
    first = ingest.run(small, "fer2013", str(SAMPLE_ZIP), str(out))
    assert (first.shards_written, first.shards_skipped) == (4, 0)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    second = ingest.run(small, "fer2013", str(SAMPLE_ZIP), str(out))
    assert (second.shards_written, second.shards_skipped) == (0, 4)
    assert second.rows == first.rows and second.by_status == first.by_status
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    # A lost shard (crash before its marker) is rebuilt alone.
    (out / "_markers" / "part-00002.json").unlink()
    third = ingest.run(small, "fer2013", str(SAMPLE_ZIP), str(out))
    assert (third.shards_written, third.shards_skipped) == (1, 3)
    assert_conserved(third, str(out), small.storage, 35)


def test_s3_output_is_identical_to_local(tmp_path: Path, settings: Settings, s3_bucket: str) -> None:
    storage = settings.storage.resolved()
    local, remote = str(tmp_path / "local"), f"{s3_bucket}/ingest-{tmp_path.name}"
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), local)
    summary = ingest.run(settings, "fer2013", str(SAMPLE_ZIP), remote)
    assert_conserved(summary, remote, storage, 35)
    assert outputs(local, storage)[0].equals(outputs(remote, storage)[0])


def test_s3_source_gives_the_same_rows(tmp_path: Path, settings: Settings, s3_bucket: str) -> None:
    storage = settings.storage.resolved()
    source = f"{s3_bucket}/src-{tmp_path.name}/fer2013.zip"
    fio.write_bytes_atomic(source, SAMPLE_ZIP.read_bytes(), storage)
    prefix = f"{s3_bucket}/src-{tmp_path.name}/tree"
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        for name in archive.namelist():
            fio.write_bytes_atomic(fio.join(prefix, name), archive.read(name), storage)
    tables = []
    for src in (str(SAMPLE_ZIP), source, prefix):
        out = str(tmp_path / f"out-{len(tables)}")
        ingest.run(settings, "fer2013", src, out)
        tables.append(outputs(out, storage)[0].select(["id", "split", "label", "image"]))
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])


def _bad_source(root: Path) -> dict[str, str]:
    """A FER-2013 layout salted with broken files; returns the status each must get."""
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        archive.extractall(root)
        jpeg = archive.read(sorted(archive.namelist())[0])
    png = io.BytesIO()
    Image.new("L", (48, 48), 90).save(png, format="PNG")
    bad = {
        "train/happy/Training_zero.jpg": (b"", "decode:empty"),
        "train/happy/Training_trunc.jpg": (jpeg[: len(jpeg) // 2], "decode:truncated"),
        "train/sad/Training_trunc.png": (png.getvalue()[: len(png.getvalue()) // 2], "decode:truncated"),
        "train/sad/Training_header.png": (png.getvalue()[:20], "decode:corrupt"),
        "train/sad/Training_text.jpg": (b"<html>502 Bad Gateway</html>", "decode:not_image"),
        "test/fear/PrivateTest_random.jpg": (bytes(range(256)) * 4, "decode:not_image"),
        "notes/readme.md": (b"# hello", "ingest:unexpected_file"),
    }
    for relpath, (data, _) in bad.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    return {relpath: expected for relpath, (_, expected) in bad.items()}


def test_bad_files_are_quarantined_with_reasons(tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    expected = _bad_source(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["ingest", "fer2013", str(tmp_path / "src"), str(out)]) == 0
    manifest = json.loads((out / "_ferray" / "ingest.json").read_text())
    summary = executor.Summary(stage="ingest", source="", out="", rows=manifest["summary"]["rows"])
    good, bad = assert_conserved(summary, str(out), settings.storage, 35 + len(expected))
    got = {row["source_path"].split("/src/")[1]: row["status"] for row in bad.to_pylist()}
    assert got == expected
    assert all(bad["error"].to_pylist()), "every quarantined row says why"
    printed = capsys.readouterr().out
    assert "decode:truncated 2" in printed and "ok 35" in printed


def test_cli_fails_fast_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["ingest", "fer2013", str(tmp_path / "missing"), str(tmp_path / "out")]) == 3
    assert capsys.readouterr().err.strip().count("\n") == 0
    monkeypatch.setenv("FERRAY_INGEST__SHARD_ROWS", "0")
    assert main(["ingest", "fer2013", str(SAMPLE_ZIP), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "ingest.shard_rows" in err and "\n" not in err
    assert not (tmp_path / "out").exists(), "nothing may be written when the job cannot run"


@pytest.mark.skipif(not FER2013_ZIP.exists(), reason="needs ../shared/datasets/fer2013.zip")
def test_full_fer2013_counts_match_the_manifest(tmp_path: Path, settings: Settings) -> None:
    out = str(tmp_path / "fer")
    summary = ingest.run(settings, "fer2013", str(FER2013_ZIP), out)
    assert summary.rows == 35887 and summary.by_status == {"ok": 35887}
    totals = {split: sum(counts.values()) for split, counts in summary.by_split_label.items()}
    assert totals == {"train": 28709, "val": 3589, "test": 3589}
    expected = {  # MANIFEST.md: train / PublicTest / PrivateTest per class
        "angry": (3995, 467, 491), "disgust": (436, 56, 55), "fear": (4097, 496, 528), "happy": (7215, 895, 879),
        "sad": (4830, 653, 594), "surprise": (3171, 415, 416), "neutral": (4965, 607, 626),
    }
    for name, counts in expected.items():
        assert tuple(summary.by_split_label[s][name] for s in ("train", "val", "test")) == counts
    assert sum(s["rows"] for s in fio.read_stats(out, settings.storage)) == 35887
