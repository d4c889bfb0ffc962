"""Every reader on a fixture in its dataset's exact release layout (no Ray: readers are pure)."""

from __future__ import annotations

import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA, SAMPLE_ZIP
from ferray.config import IngestSettings, StorageSettings
from ferray.data.datasets import READERS
from ferray.data.ingest import build_shard
from ferray.data.io import Tree
from ferray.data.schema import LABELS

STORAGE = StorageSettings()
SETTINGS = IngestSettings()


def ingest_rows(dataset: str, source: str) -> list[dict]:
    tree = Tree(source, STORAGE)
    listing = READERS[dataset](tree, tree.files(), SETTINGS)
    return build_shard(listing.entries, tree, dataset, source, SETTINGS).to_pylist()


def test_fer2013_image_folders_split_by_prefix() -> None:
    rows = ingest_rows("fer2013", str(SAMPLE_ZIP))
    assert len(rows) == 35 and all(r["status"] == "ok" for r in rows)
    assert Counter(r["split"] for r in rows) == {"train": 21, "val": 7, "test": 7}
    for row in rows:
        name = row["source_path"].rsplit("/", 1)[-1]
        expected = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}[name.split("_")[0]]
        assert row["split"] == expected
        assert LABELS[row["label"]] == row["label_name"] == row["source_path"].split("/")[-2]


def test_fer2013_ids_are_the_same_from_zip_dir_and_enclosing_folder(tmp_path: Path) -> None:
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        archive.extractall(tmp_path / "outer" / "fer2013")
    from_zip = {r["id"]: r["label"] for r in ingest_rows("fer2013", str(SAMPLE_ZIP))}
    from_dir = {r["id"]: r["label"] for r in ingest_rows("fer2013", str(tmp_path / "outer"))}
    assert from_zip == from_dir


def test_fer2013_csv_matches_the_image_release() -> None:
    rows = ingest_rows("fer2013-csv", str(DATA / "fer2013-csv" / "fer2013.csv"))
    images = ingest_rows("fer2013", str(SAMPLE_ZIP))
    assert len(rows) == len(images) and all(r["status"] == "ok" for r in rows)
    assert Counter((r["split"], r["label"]) for r in rows) == Counter((r["split"], r["label"]) for r in images)
    # The same file given as a folder holding the CSV reads the same rows.
    assert [r["id"] for r in ingest_rows("fer2013-csv", str(DATA / "fer2013-csv"))] == [r["id"] for r in rows]


def test_fer2013_csv_bad_rows_become_status_rows(tmp_path: Path) -> None:
    csv = tmp_path / "fer2013.csv"
    good = " ".join(["7"] * 2304)
    csv.write_text(f"emotion,pixels,Usage\n3,{good},Training\n9,{good},Training\n2,1 2 3,PublicTest\n")
    rows = ingest_rows("fer2013-csv", str(csv))
    assert [r["status"] for r in rows] == ["ok", "ingest:no_label", "decode:bad_pixels"]


def test_rafdb_basic_layout_maps_codes_and_carves_val() -> None:
    rows = ingest_rows("rafdb", str(DATA / "rafdb"))
    assert len(rows) == 35 and all(r["status"] == "ok" for r in rows)
    splits = Counter(r["split"] for r in rows)
    assert splits["test"] == 14 and splits["train"] + splits["val"] == 21
    labels = (DATA / "rafdb" / "basic" / "EmoLabel" / "list_patition_label.txt").read_text().split("\n")
    codes = dict(line.split() for line in labels if line)
    raf = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "angry", 7: "neutral"}
    for row in rows:
        key = row["source_path"].rsplit("/", 1)[-1].replace("_aligned", "")
        assert row["label_name"] == raf[int(codes[key])]


def test_rafdb_val_carving_is_seeded() -> None:
    tree = Tree(str(DATA / "rafdb"), STORAGE)
    split = {}
    for seed in (0, 0, 1):
        entries = READERS["rafdb"](tree, tree.files(), IngestSettings(seed=seed, val_fraction=0.5)).entries
        split.setdefault(seed, []).append([e.split for e in entries])
    assert split[0][0] == split[0][1] and split[0][0] != split[1][0]


def test_rafdb_missing_images_and_unlabelled_files_are_rows(tmp_path: Path) -> None:
    root = tmp_path / "raf"
    shutil.copytree(DATA / "rafdb" / "basic", root)
    (root / "Image" / "aligned" / "train_00001_aligned.jpg").unlink()
    shutil.copy(root / "Image" / "aligned" / "train_00002_aligned.jpg", root / "Image" / "aligned" / "train_99999_aligned.jpg")
    rows = ingest_rows("rafdb", str(root))
    by_status = Counter(r["status"] for r in rows)
    assert by_status == {"ok": 34, "ingest:missing_file": 1, "ingest:no_label": 1}


def test_ckplus48_keeps_contempt_with_null_label() -> None:
    rows = ingest_rows("ckplus", str(DATA / "ckplus48"))
    assert all(r["status"] == "ok" and r["split"] is None for r in rows)
    contempt = [r for r in rows if r["label_name"] == "contempt"]
    assert len(contempt) == 1 and contempt[0]["label"] is None
    assert {r["label_name"] for r in rows} - {"contempt"} <= set(LABELS)
    assert len(rows) == 3 * 18 + 1


def test_ckplus_full_release_takes_last_frame_of_labelled_sequences() -> None:
    tree = Tree(str(DATA / "ckplus-full"), STORAGE)
    listing = READERS["ckplus"](tree, tree.files(), SETTINGS)
    rows = build_shard(listing.entries, tree, "ckplus", tree.uri, SETTINGS).to_pylist()
    emotion_files = list((DATA / "ckplus-full" / "Emotion").rglob("*_emotion.txt"))
    assert len(rows) == len(emotion_files) and all(r["status"] == "ok" for r in rows)
    for row in rows:
        sequence = Path(row["source_path"]).parent
        assert Path(row["source_path"]).name == sorted(p.name for p in sequence.iterdir())[-1]
    assert [r["label"] for r in rows if r["label_name"] == "contempt"] == [None]
    assert listing.ignored["frames of unlabelled sequences"] > 0


def test_jaffe_labels_from_file_names() -> None:
    rows = ingest_rows("jaffe", str(DATA / "jaffe"))
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    codes = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise"}
    for row in rows:
        assert row["label_name"] == codes[row["source_path"].rsplit("/", 1)[-1].split(".")[1][:2]]


def test_folder_layout_with_split_and_unknown_class(tmp_path: Path) -> None:
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        faces = [archive.read(n) for n in sorted(archive.namelist())[:3]]
    for relpath, data in zip(["train/Happiness/a.jpg", "val/anger/b.jpg", "contempt/c.jpg"], faces):
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_bytes(data)
    (tmp_path / "loose.jpg").write_bytes(faces[0])
    rows = {r["source_path"].split(str(tmp_path) + "/")[1]: r for r in ingest_rows("folder", str(tmp_path))}
    assert (rows["train/Happiness/a.jpg"]["label_name"], rows["train/Happiness/a.jpg"]["split"]) == ("happy", "train")
    assert (rows["val/anger/b.jpg"]["label_name"], rows["val/anger/b.jpg"]["split"]) == ("angry", "val")
    assert (rows["contempt/c.jpg"]["label"], rows["contempt/c.jpg"]["label_name"]) == (None, "contempt")
    assert rows["loose.jpg"]["status"] == "ingest:no_label"


@pytest.mark.parametrize("dataset", sorted(READERS))
def test_every_reader_accounts_for_stray_and_broken_files(dataset: str, tmp_path: Path) -> None:
    source = {"fer2013": None, "fer2013-csv": DATA / "fer2013-csv", "rafdb": DATA / "rafdb", "ckplus": DATA / "ckplus48",
              "jaffe": DATA / "jaffe", "folder": None}[dataset]
    root = tmp_path / "src"
    if source is None:
        with zipfile.ZipFile(SAMPLE_ZIP) as archive:
            archive.extractall(root)
    else:
        shutil.copytree(source, root)
    before = len(ingest_rows(dataset, str(root)))
    (root / "README.txt").write_text("not an image")
    rows = ingest_rows(dataset, str(root))
    assert len(rows) == before + 1, "a stray file must appear as a row"
    stray = [r for r in rows if r["source_path"].endswith("README.txt")][0]
    assert stray["status"] in {"ingest:unexpected_file", "ingest:no_label"}
