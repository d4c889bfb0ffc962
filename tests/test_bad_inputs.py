"""Bad inputs through `ferray ingest`, `align` and `annotate`: a corpus generated here (no stored binaries).

Every input ends as a row, in the output or the quarantine, with a specific status; the counts add
up; the command line exits 0. The statuses seen are the table in docs/bad-inputs.md, which the last
test compares with this run (`UPDATE_BAD_INPUTS_DOC=1` rewrites it from the run instead).
"""

from __future__ import annotations

import io as pyio
import os
import random
import struct
import tarfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ferray import executor
from ferray.annotate import plan
from ferray.data import io
from ferray.cli import main
from ferray.config import StorageSettings, load_settings
from ferray.data.datasets import READERS
from ferray.data.ingest import row_id
from ferray.data.schema import INGEST_SCHEMA
from test_annotate import all_rows
from test_faces import SAMPLES, canvas, load_face
from test_ingest import assert_conserved, outputs
from test_video import face_frame, write_video

pytestmark = pytest.mark.usefixtures("ray_session")

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
CLASS = "happy"  # the folder dataset's class folder that holds the corpus
LOCAL = StorageSettings()
QUARANTINED = "— (quarantined by ingest)"
NO_ROWS = "no rows, exit 0"


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One bad (or merely odd) input: the table's label, its file name (bytes: one is not UTF-8), its bytes."""

    label: str
    name: bytes
    data: bytes

    @property
    def key(self) -> str:
        """The name as rows show it (`io.printable`: undecodable bytes as %XX)."""
        return io.printable(os.fsdecode(self.name))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = pyio.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width×height pixels, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def face_video(path: Path, frames: int = 20) -> bytes:
    """A 2 s MJPG AVI (10 fps) of a FER face HOG finds with and without upsampling; AVI keeps its index up
    front, so a cut file still opens."""
    face = load_face([p for p in SAMPLES if p.parent.name == "happy"][0])
    write_video(path, "MJPG", 10.0, [face_frame(face, k % 5, 40) for k in range(frames)])
    data = path.read_bytes()
    path.unlink()
    return data


def corpus(scratch: Path) -> list[Case]:
    """Every case the issue lists that a folder can hold; images are FER faces on canvases HOG finds."""
    face, _ = canvas(load_face([p for p in SAMPLES if p.parent.name == "happy"][0]), random.Random(0))
    grey = Image.fromarray(face)
    rgb = grey.convert("RGB")
    rgba = np.array(rgb.convert("RGBA"))
    rgba[:12, :, 3] = 0  # a transparent band: composited on white, the face untouched
    jpeg, png = _encode(rgb, "JPEG"), _encode(grey, "PNG")
    video = face_video(scratch / "clip.avi")
    noise = np.random.default_rng(0)
    return [
        Case("zero-byte file", b"zero-byte.jpg", b""),
        Case("truncated JPEG (first half)", b"truncated.jpg", jpeg[: len(jpeg) // 2]),
        Case("truncated PNG (first half)", b"truncated.png", png[: len(png) // 2]),
        Case("random bytes named .jpg", b"random-bytes.jpg", noise.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        Case("HTML error page named .png", b"error-page.png",
             b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"),
        Case("16-bit grey PNG", b"sixteen-bit.png", _encode(Image.fromarray(face.astype(np.uint16) * 257), "PNG")),
        Case("RGBA PNG (transparent band)", b"rgba.png", _encode(Image.fromarray(rgba), "PNG")),
        Case("palette PNG", b"palette.png", _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        Case("CMYK JPEG", b"cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG")),
        Case("1×1 image", b"one-pixel.png", _encode(Image.new("L", (1, 1), 128), "PNG")),
        Case("PNG declaring 50,000×50,000 pixels", b"declares-50000x50000.png", declared_png(50_000, 50_000)),
        Case("non-UTF-8 file name (Latin-1 `é`)", b"caf\xe9-latin1.png", png),
        Case("250-byte image file name", b"i" * 246 + b".png", png),
        Case("250-byte video file name", b"v" * 246 + b".avi", video),
        Case("video of garbage bytes (.mp4)", b"garbage.mp4", noise.integers(0, 256, 20_000, dtype=np.uint8).tobytes()),
        Case("video truncated mid-stream (60% of an AVI)", b"truncated-mid-stream.avi", video[: len(video) * 6 // 10]),
    ]


def write_corpus(root: Path, cases: list[Case]) -> None:
    folder = os.path.join(os.fsencode(root), CLASS.encode())
    os.makedirs(folder)
    for case in cases:
        with open(os.path.join(folder, case.name), "wb") as handle:
            handle.write(case.data)
    (root / "empty-folder").mkdir()  # a class folder with nothing in it: nothing to list, nothing lost


def unsafe_archives(folder: Path, good: bytes, video: bytes) -> dict[str, tuple[Path, list[str]]]:
    """A zip and a tar whose members try to leave the archive; returns each archive and its unsafe members."""
    members = {f"{CLASS}/good.png": good, f"{CLASS}/clip.avi": video}
    zip_bad = ["../escape.png", f"{CLASS}/../../escape-deep.png", "/tmp/escape-absolute.png"]
    tar_bad = ["../escape.png", f"{CLASS}/../../escape.avi", "../../escape-deep.png"]
    archive = folder / "unsafe.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
        for name in zip_bad:
            handle.writestr(name, video if name.endswith(".avi") else good)
    tarball = folder / "unsafe.tar"
    with tarfile.open(tarball, "w") as handle:
        for name, data in [*members.items(), *((n, video if n.endswith(".avi") else good) for n in tar_bad)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, pyio.BytesIO(data))
    return {"zip": (archive, zip_bad), "tar": (tarball, tar_bad)}


# --------------------------------------------------------------------------- reading results


def cell(statuses: list[str]) -> str:
    """A table cell: the statuses one input got, `×n` where it got several rows of one status."""
    counts = Counter(statuses)
    return ", ".join(f"`{s}`" + (f" ×{n}" if n > 1 else "") for s, n in sorted(counts.items())) if counts else NO_ROWS


def by_name(rows: pa.Table) -> dict[str, list[str]]:
    """Statuses by the last part of each row's source path."""
    out: dict[str, list[str]] = {}
    for path, row_status in zip(rows["source_path"].to_pylist(), rows["status"].to_pylist()):
        out.setdefault(path.rsplit("/", 1)[-1], []).append(row_status)
    return out


def stage_rows(out: str, storage: StorageSettings) -> pa.Table:
    good, bad = outputs(out, storage)
    return pa.concat_tables([good, bad], promote_options="default")


def assert_specific(rows: pa.Table) -> None:
    """Every non-ok row names its stage and reason and says why."""
    for row in rows.to_pylist():
        if row["status"] != "ok":
            stage, _, reason = row["status"].partition(":")
            assert stage and reason and reason != "error", row["status"]
            assert row["error"], row["status"]


def unchecked_shard(cases: list[Case], folder: str) -> None:
    """An ingest-shaped shard holding every corpus file as an `ok` row, as if an upstream had checked nothing."""
    rows = [{"id": row_id("folder", f"{CLASS}/{case.key}"), "dataset": "folder", "split": None,
             "source_path": f"unchecked/{CLASS}/{case.key}", "label": 3, "label_name": CLASS, "image": case.data,
             "status": "ok", "error": None} for case in cases]
    table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
    io.ShardSink(folder, LOCAL).write("part-00000", table, "unchecked", executor.shard_stats("part-00000", table))


# --------------------------------------------------------------------------- the runs (once per module)

COLUMNS = ("ingest (`folder`)", "align (after ingest)", "align (unchecked bytes)", "annotate")


@dataclass
class Runs:
    """The corpus and where each stage wrote what it made of it."""

    cases: list[Case]
    base: Path
    out: dict[str, str]  # run name → OUT
    unsafe: dict[str, list[str]]  # archive kind → its unsafe member names
    escapes: set[str]  # file names an escaping member would create


def cli(*argv: str) -> None:
    """`ferray …` as a user runs it; every run here must exit 0."""
    assert main([*argv, "--log-level", "WARNING"]) == 0, argv


def _delete_after(listing: Callable[..., Any], victim: str, storage: StorageSettings) -> Callable[..., Any]:
    """`listing`, then the victim object deleted: the race of a file removed while a job runs."""
    def listed_then_deleted(*args: Any, **kwargs: Any) -> Any:
        found = listing(*args, **kwargs)
        fs, path = io.url_to_fs(victim, storage)
        fs.rm(path)
        return found
    return listed_then_deleted


def _s3_source(prefix: str, files: dict[str, bytes], storage: StorageSettings) -> str:
    for name, data in files.items():
        io.write_bytes_atomic(io.join(prefix, CLASS, name), data, storage)
    return prefix


def _corpus_runs(source: Path, cases: list[Case], out: dict[str, str]) -> None:
    """The corpus folder through ingest → align, align on unchecked bytes, and annotate."""
    cli("ingest", "folder", str(source), out["ingested"])
    cli("align", out["ingested"], out["aligned"])
    unchecked_shard(cases, out["unchecked-in"])
    cli("align", out["unchecked-in"], out["unchecked"])
    cli("annotate", "default", str(source), out["annotated"], "--fps", "2")


def _deleted_runs(prefix: str, image: bytes, out: dict[str, str]) -> None:
    """An S3 SOURCE whose `deleted.png` goes after the driver listed it and before a worker reads it."""
    storage = load_settings().storage.resolved()
    with pytest.MonkeyPatch.context() as patch:
        source = _s3_source(f"{prefix}/ingest", {"kept.png": image, "deleted.png": image}, storage)
        patch.setitem(READERS, "folder", _delete_after(READERS["folder"], f"{source}/{CLASS}/deleted.png", storage))
        cli("ingest", "folder", source, out["s3-ingested"])
    with pytest.MonkeyPatch.context() as patch:
        source = _s3_source(f"{prefix}/annotate", {"kept.png": image, "deleted.png": image}, storage)
        patch.setattr(plan, "inputs", _delete_after(plan.inputs, f"{source}/{CLASS}/deleted.png", storage))
        cli("annotate", "default", source, out["s3-annotated"])


def _archive_runs(archives: dict[str, tuple[Path, list[str]]], temp: Path, out: dict[str, str]) -> None:
    for kind, (archive, _) in archives.items():
        cli("ingest", "folder", str(archive), out[f"{kind}-ingested"])
        with pytest.MonkeyPatch.context() as patch:
            # Videos copied out of the archive to a temp file: the one path that writes a member to disk.
            patch.setenv("FERRAY_ANNOTATE__VIDEO_IO", "copy")
            patch.setenv("FERRAY_ANNOTATE__TEMP_DIR", str(temp))
            cli("annotate", "default", str(archive), out[f"{kind}-annotated"], "--fps", "2")


def _empty_runs(empty: Path, out: dict[str, str]) -> None:
    empty.mkdir()
    cli("ingest", "folder", str(empty), out["empty-ingested"])
    cli("align", out["empty-ingested"], out["empty-aligned"])
    cli("annotate", "default", str(empty), out["empty-annotated"])


RUNS = ("ingested", "aligned", "unchecked-in", "unchecked", "annotated", "s3-ingested", "s3-annotated", "zip-ingested",
        "tar-ingested", "zip-annotated", "tar-annotated", "empty-ingested", "empty-aligned", "empty-annotated")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_bucket: str) -> Runs:
    base = tmp_path_factory.mktemp("bad-inputs")
    cases = corpus(base)
    write_corpus(base / "corpus", cases)
    out = {name: str(base / name) for name in RUNS}
    _corpus_runs(base / "corpus", cases, out)
    face = next(c.data for c in cases if c.name == b"sixteen-bit.png")
    _deleted_runs(f"{s3_bucket}/bad-inputs-{base.name}", face, out)
    archives = unsafe_archives(base, face, next(c.data for c in cases if c.name.startswith(b"vvv")))
    (base / "video-temp").mkdir()
    _archive_runs(archives, base / "video-temp", out)
    _empty_runs(base / "empty-source", out)
    escapes = {Path(name).name for _, names in archives.values() for name in names}
    return Runs(cases, base, out, {kind: names for kind, (_, names) in archives.items()}, escapes)


# --------------------------------------------------------------------------- what each input got

# input → (ingest, align after ingest, align on unchecked bytes, annotate); the runs must give exactly this.
Q, NONE = QUARANTINED, "—"
EMPTY, NOT_IMAGE, TRUNCATED = "`decode:empty`", "`decode:not_image`", "`decode:truncated`"
OK, SMALL, LARGE = "`ok`", "`align:too_small`", "`decode:too_large`"
EXPECTED: dict[str, tuple[str, str, str, str]] = {
    "zero-byte file": (EMPTY, Q, EMPTY, EMPTY),
    "truncated JPEG (first half)": (TRUNCATED, Q, TRUNCATED, TRUNCATED),
    "truncated PNG (first half)": (TRUNCATED, Q, TRUNCATED, TRUNCATED),
    "random bytes named .jpg": (NOT_IMAGE, Q, NOT_IMAGE, NOT_IMAGE),
    "HTML error page named .png": (NOT_IMAGE, Q, NOT_IMAGE, NOT_IMAGE),
    "16-bit grey PNG": (OK, OK, OK, OK),
    "RGBA PNG (transparent band)": (OK, OK, OK, OK),
    "palette PNG": (OK, OK, OK, OK),
    "CMYK JPEG": (OK, OK, OK, OK),
    "1×1 image": (OK, SMALL, SMALL, SMALL),
    "PNG declaring 50,000×50,000 pixels": (LARGE, Q, LARGE, LARGE),
    "non-UTF-8 file name (Latin-1 `é`)": (OK, OK, OK, OK),
    "250-byte image file name": (OK, OK, OK, OK),
    # Ingest and align take images only; annotate samples frames 0, 5, 10 and 15 (the cut file ends at 12).
    "250-byte video file name": (NOT_IMAGE, Q, NOT_IMAGE, "`ok` ×4"),
    "video of garbage bytes (.mp4)": (NOT_IMAGE, Q, NOT_IMAGE, "`video:unreadable`"),
    "video truncated mid-stream (60% of an AVI)": (NOT_IMAGE, Q, NOT_IMAGE, "`ok` ×3, `video:short_read`"),
    "an empty class folder inside SOURCE": ("nothing listed", "nothing listed", NONE, "nothing listed"),
    "zip members `../escape.png`, `happy/../../escape-deep.png`, `/tmp/escape-absolute.png`":
        ("`ingest:unsafe_path` ×3", Q, NONE, "`media:unsafe_path` ×3"),
    "tar members `../escape.png`, `happy/../../escape.avi`, `../../escape-deep.png`":
        ("`ingest:unsafe_path` ×3", Q, NONE, "`media:unsafe_path` ×3"),
    "S3 object deleted between listing and reading": ("`read:missing`", Q, NONE, "`read:missing`"),
    "SOURCE that is an empty folder": ("0 rows, exit 0", "0 rows, exit 0", NONE, "0 rows, exit 0"),
}


def observed(runs: Runs) -> dict[str, tuple[str, str, str, str]]:
    """The table, read back from every run's outputs."""
    ingested = by_name(stage_rows(runs.out["ingested"], LOCAL))
    aligned = by_name(stage_rows(runs.out["aligned"], LOCAL))
    unchecked = by_name(stage_rows(runs.out["unchecked"], LOCAL))
    annotated = by_name(all_rows(runs.out["annotated"], LOCAL))
    table: dict[str, tuple[str, str, str, str]] = {}
    for case in runs.cases:
        after = cell(aligned.get(case.key, [])) if ingested[case.key] == ["ok"] else QUARANTINED
        table[case.label] = (cell(ingested[case.key]), after, cell(unchecked[case.key]), cell(annotated[case.key]))
    def listed(rows: dict[str, list[str]], paths: pa.Table) -> str:
        inside = [p for p in paths["source_path"].to_pylist() if "/empty-folder/" in p]
        return "nothing listed" if not inside else cell([rows[p.rsplit("/", 1)[-1]][0] for p in inside])

    table["an empty class folder inside SOURCE"] = (
        listed(ingested, stage_rows(runs.out["ingested"], LOCAL)), listed(aligned, stage_rows(runs.out["aligned"], LOCAL)),
        NONE, listed(annotated, all_rows(runs.out["annotated"], LOCAL)))

    def escaped(out: str, reader: Callable[[str, StorageSettings], pa.Table]) -> str:
        rows = by_name(reader(out, LOCAL))
        return cell([s for name, statuses in rows.items() if name in runs.escapes for s in statuses])

    for kind in ("zip", "tar"):
        names = ", ".join(f"`{n}`" for n in runs.unsafe[kind])
        table[f"{kind} members {names}"] = (escaped(runs.out[f"{kind}-ingested"], stage_rows), QUARANTINED, NONE,
                                            escaped(runs.out[f"{kind}-annotated"], all_rows))
    storage = load_settings().storage.resolved()
    gone_ingest = by_name(stage_rows(runs.out["s3-ingested"], storage))["deleted.png"]
    gone_annotate = by_name(all_rows(runs.out["s3-annotated"], storage))["deleted.png"]
    table["S3 object deleted between listing and reading"] = (cell(gone_ingest), QUARANTINED, NONE, cell(gone_annotate))
    table["SOURCE that is an empty folder"] = (
        _empty_cell(runs.out["empty-ingested"], "ingest"), _empty_cell(runs.out["empty-aligned"], "align"), NONE,
        # annotate writes nothing at all when SOURCE holds nothing (checked below), and exited 0 (cli()).
        "0 rows, exit 0" if not Path(runs.out["empty-annotated"]).exists() else "wrote output")
    return table


def _empty_cell(out: str, stage: str) -> str:
    """`N rows, exit 0` for a run on an empty SOURCE (`cli()` already checked the exit status)."""
    return f"{io.read_json(io.join(out, io.META, f'{stage}.json'), LOCAL)['summary']['rows']} rows, exit 0"


def test_ingest_keeps_every_file_as_a_row(runs: Runs) -> None:
    summary = executor.Summary(stage="ingest", source="", out="", rows=len(runs.cases))
    good, bad = assert_conserved(summary, runs.out["ingested"], LOCAL, len(runs.cases))
    assert_specific(bad)
    names = by_name(pa.concat_tables([good, bad]))
    assert sorted(names) == sorted(case.key for case in runs.cases), "every file is a row, once"
    record = io.read_json(io.join(runs.out["ingested"], io.META, "ingest.json"), LOCAL)
    assert record["summary"]["rows"] == len(runs.cases)


def test_align_keeps_every_row_after_ingest_and_on_unchecked_bytes(runs: Runs) -> None:
    ingested_ok = outputs(runs.out["ingested"], LOCAL)[0]
    summary = executor.Summary(stage="align", source="", out="", rows=ingested_ok.num_rows)
    good, bad = assert_conserved(summary, runs.out["aligned"], LOCAL, ingested_ok.num_rows)
    assert sorted(good["id"].to_pylist() + bad["id"].to_pylist()) == sorted(ingested_ok["id"].to_pylist())
    assert_specific(bad)
    summary = executor.Summary(stage="align", source="", out="", rows=len(runs.cases))
    good, bad = assert_conserved(summary, runs.out["unchecked"], LOCAL, len(runs.cases))
    assert_specific(bad)
    # Odd pixel formats still decode to the face they hold: the face is found, not the full frame.
    names = [path.rsplit("/", 1)[-1] for path in good["source_path"].to_pylist()]
    detected = dict(zip(names, good["face_source"].to_pylist()))
    for name in ("sixteen-bit.png", "rgba.png", "palette.png", "cmyk.jpg", "caf%E9-latin1.png"):
        assert detected[name] == "detected", name


def test_annotate_keeps_every_file_and_adds_up(runs: Runs) -> None:
    out = runs.out["annotated"]
    rows = all_rows(out, LOCAL)
    assert sorted(by_name(rows)) == sorted(case.key for case in runs.cases)
    assert len(set(rows["id"].to_pylist())) == rows.num_rows, "no row twice"
    assert_specific(rows)
    stats = io.read_stats(out, LOCAL)
    assert sum(s["rows"] for s in stats) == rows.num_rows
    assert sum((Counter(s["by_status"]) for s in stats), Counter()) == Counter(rows["status"].to_pylist())
    record = io.read_json(io.join(out, io.META, "annotate.json"), LOCAL)
    assert record["summary"]["rows"] == rows.num_rows
    # Each video that decoded gets its summary, a 250-byte name included (shortened to fit).
    from ferray.annotate.media import output_path

    for case in runs.cases:
        if case.key.endswith(".avi"):
            assert Path(out, "videos", output_path(f"{CLASS}/{case.key}", ".parquet")).is_file(), case.label


def test_a_deleted_s3_object_is_read_missing(runs: Runs) -> None:
    storage = load_settings().storage.resolved()
    for out, reader in ((runs.out["s3-ingested"], stage_rows), (runs.out["s3-annotated"], all_rows)):
        rows = by_name(reader(out, storage))
        assert rows == {"kept.png": ["ok"], "deleted.png": ["read:missing"]}


def test_archive_members_never_leave_the_archive(runs: Runs) -> None:
    for kind in ("zip", "tar"):
        ingested = by_name(stage_rows(runs.out[f"{kind}-ingested"], LOCAL))
        assert ingested["good.png"] == ["ok"] and ingested["clip.avi"] == ["decode:not_image"]
        annotated = by_name(all_rows(runs.out[f"{kind}-annotated"], LOCAL))
        assert "ok" in annotated["clip.avi"], "a safe video in the archive is read (copied to a temp file)"
        for rows, reason in ((ingested, "ingest:unsafe_path"), (annotated, "media:unsafe_path")):
            assert sorted(s for name in runs.escapes if name in rows for s in rows[name]) == [reason] * 3
    # Nothing was written outside OUT: no escaped file anywhere near, and no temp copy left behind.
    for where in (runs.base, runs.base.parent, Path.cwd(), Path("/tmp")):
        assert not [p for p in where.glob("escape*")], where
    assert not list((runs.base / "video-temp").iterdir())


def test_an_empty_source_runs_every_stage_to_zero_rows(runs: Runs) -> None:
    for stage, out in (("ingest", "empty-ingested"), ("align", "empty-aligned")):
        record = io.read_json(io.join(runs.out[out], io.META, f"{stage}.json"), LOCAL)
        assert record["summary"]["rows"] == 0 and record["summary"]["shards_written"] == 0
    assert not Path(runs.out["empty-annotated"]).exists(), "annotate writes nothing when there is nothing"


def render(table: dict[str, tuple[str, str, str, str]]) -> str:
    header = "| input | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return header + "".join(f"| {label} | " + " | ".join(cells) + " |\n" for label, cells in table.items())


def test_the_table_is_what_the_runs_gave_and_what_the_docs_say(runs: Runs) -> None:
    table = observed(runs)
    rendered = render(table)
    begin, end = "<!-- table: generated by tests/test_bad_inputs.py -->\n", "<!-- end of table -->\n"
    if os.environ.get("UPDATE_BAD_INPUTS_DOC"):
        text = DOC.read_text()
        DOC.write_text(text[: text.index(begin) + len(begin)] + rendered + text[text.index(end) :])
    assert table == EXPECTED
    text = DOC.read_text()
    assert text[text.index(begin) + len(begin) : text.index(end)] == rendered


def test_odd_names_get_usable_forms() -> None:
    """The pure helpers behind two fixes: printable names and per-video outputs that fit NAME_MAX."""
    from ferray.annotate.media import NAME_MAX, output_path

    assert io.printable(os.fsdecode(b"a/caf\xe9.png")) == "a/caf%E9.png"
    assert io.printable("a/café.png") == "a/café.png"
    assert output_path("clips/talk.mp4", ".parquet") == "clips/talk.mp4.parquet"
    for name in ("v" * 246 + ".avi", "é" * 125 + ".avi"):  # 250 and 254 bytes, one- and two-byte characters
        short = output_path(f"clips/{name}", ".parquet")
        folder, _, last = short.rpartition("/")
        assert folder == "clips" and last.endswith(".parquet") and len(last.encode()) <= NAME_MAX
        assert last[:10] == name[:10]
    assert output_path("v" * 250 + "1.avi", ".png") != output_path("v" * 250 + "2.avi", ".png")
