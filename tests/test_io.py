"""Storage: one API for local paths, file:// and s3://; trees; atomic shard sinks with markers."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from ferray.data import io as fio
from ferray.config import StorageSettings


@pytest.fixture()
def storage(s3_bucket: str) -> StorageSettings:
    return StorageSettings().resolved()


@pytest.mark.parametrize("scheme", ["plain", "file", "s3"])
def test_atomic_write_read_roundtrip(scheme: str, tmp_path: Path, s3_bucket: str, storage: StorageSettings) -> None:
    base = {"plain": str(tmp_path), "file": f"file://{tmp_path}", "s3": f"{s3_bucket}/io-{tmp_path.name}"}[scheme]
    target = fio.join(base, "a", "b.bin")
    fio.write_bytes_atomic(target, b"hello", storage)
    assert fio.read_bytes(target, storage) == b"hello"
    assert fio.exists(target, storage)
    if scheme != "s3":
        assert not list(tmp_path.rglob("*.tmp-*")), "temporary files must not be left behind"


def test_shard_sink_splits_and_marks(tmp_path: Path, storage: StorageSettings) -> None:
    sink = fio.ShardSink(str(tmp_path / "out"), storage)
    table = pa.table({"id": ["a", "b", "c"], "status": ["ok", "decode:empty", "ok"]})
    assert sink.completed("part-00000", "fp") is None
    sink.write("part-00000", table, "fp", {"rows": 3})
    assert fio.read_parquet(sink.data_uri("part-00000"), storage)["id"].to_pylist() == ["a", "c"]
    assert fio.read_parquet(sink.quarantine_uri("part-00000"), storage)["id"].to_pylist() == ["b"]
    assert sink.completed("part-00000", "fp") == {"rows": 3}
    assert sink.completed("part-00000", "other-input") is None
    assert fio.completed_shards(str(tmp_path / "out"), storage) == [sink.data_uri("part-00000")]
    # A clean rewrite removes the earlier quarantine, so outputs always describe one run.
    sink.write("part-00000", table.filter(pa.array([True, False, True])), "fp2", {"rows": 2})
    assert not fio.exists(sink.quarantine_uri("part-00000"), storage)
    # Every row lands in one of the two files, a row with no status included.
    sink.write("part-00001", pa.table({"id": ["d", "e"], "status": ["ok", None]}), "fp", {"rows": 2})
    assert fio.read_parquet(sink.data_uri("part-00001"), storage)["id"].to_pylist() == ["d"]
    assert fio.read_parquet(sink.quarantine_uri("part-00001"), storage)["id"].to_pylist() == ["e"]


def test_completed_shards_needs_markers(tmp_path: Path, storage: StorageSettings) -> None:
    with pytest.raises(fio.StorageError, match="no finished shards"):
        fio.completed_shards(str(tmp_path), storage)


def _archive_members() -> dict[str, bytes]:
    return {"top/x/1.txt": b"one", "top/y/2.txt": b"two"}


@pytest.mark.parametrize("kind", ["dir", "zip", "tar.gz"])
def test_tree_lists_and_reads(kind: str, tmp_path: Path, storage: StorageSettings) -> None:
    members = _archive_members()
    if kind == "dir":
        for name, data in members.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
        uri = str(tmp_path)
    elif kind == "zip":
        uri = str(tmp_path / "a.zip")
        with zipfile.ZipFile(uri, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        uri = str(tmp_path / "a.tar.gz")
        with tarfile.open(uri, "w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    tree = fio.Tree(uri, storage)
    files = tree.files()
    assert [f.relpath for f in files] == sorted(members)
    assert {f.relpath: tree.read(f.member) for f in files} == members


def test_tree_on_s3_prefix(s3_bucket: str, storage: StorageSettings) -> None:
    prefix = f"{s3_bucket}/tree-test"
    for name, data in _archive_members().items():
        fio.write_bytes_atomic(fio.join(prefix, name), data, storage)
    tree = fio.Tree(prefix, storage)
    assert {f.relpath: tree.read(f.member) for f in tree.files()} == _archive_members()
    # No listing is kept in memory: s3fs's listings cache would hold every object's info of a huge
    # prefix for the life of the process (and miss files other processes add); a new listing lists anew.
    fio.write_bytes_atomic(fio.join(prefix, "later/new.jpg"), b"new", storage)
    assert [f.relpath for f in fio.Tree(prefix, storage).files() if f.relpath.startswith("later/")] == ["later/new.jpg"]
    assert len(tree.fs.dircache) == 0


def test_unsafe_archive_members_are_flagged_not_followed(tmp_path: Path, storage: StorageSettings) -> None:
    uri = str(tmp_path / "evil.zip")
    with zipfile.ZipFile(uri, "w") as archive:
        archive.writestr("../../escape.txt", b"x")
        archive.writestr("/abs/path.txt", b"y")
        archive.writestr("fine/ok.txt", b"z")
    relpaths = {f.member: f.relpath for f in fio.Tree(uri, storage).files()}
    assert relpaths == {"../../escape.txt": None, "/abs/path.txt": None, "fine/ok.txt": "fine/ok.txt"}
    assert not (tmp_path.parent / "escape.txt").exists()


def test_unreachable_storage_is_one_line(storage: StorageSettings) -> None:
    broken = StorageSettings(endpoint_url="http://127.0.0.1:1", access_key_id="k", secret_access_key="s")
    with pytest.raises(fio.StorageError) as caught:
        fio.check_reachable("s3://nowhere/x", broken, must_exist=True)
    assert "\n" not in str(caught.value)
    with pytest.raises(fio.StorageError, match="not found"):
        fio.check_reachable("/definitely/not/here", storage, must_exist=True)
