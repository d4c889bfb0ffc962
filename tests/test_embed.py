"""`ferray embed` on local Ray: frozen Lite0 embeddings, identical to a plain predict, cached per backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_ZIP
from ferray.data import ingest
from ferray.faces import stage as align
from ferray.model import embed
from ferray.model.backbones import build_backbone
from ferray.data.schema import BACKBONE, EMBEDDING
from test_ingest import assert_conserved

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ferray.config import load_settings

    settings = load_settings(ray={"progress_bars": False})
    root = tmp_path_factory.mktemp("embed")
    ingest.run(settings, "fer2013", str(SAMPLE_ZIP), str(root / "in"))
    align.run(settings, str(root / "in"), str(root / "aligned"))
    return str(root / "aligned")


def test_embeddings_match_a_plain_predict_and_are_cached(aligned: str, tmp_path: Path, settings) -> None:
    out = str(tmp_path / "embedded")
    summary = embed.run(settings, aligned, out)
    good, bad = assert_conserved(summary, out, settings.storage, 35)
    assert bad.num_rows == 0
    vectors = np.array(good[EMBEDDING].to_pylist(), np.float32)
    assert vectors.shape == (35, 1280) and np.isfinite(vectors).all() and vectors.std() > 0
    names = set(good[BACKBONE].to_pylist())
    assert len(names) == 1 and next(iter(names)).startswith("efficientnet-lite0-48px-c1-")
    faces = embed.decode_faces(good["face"].to_pylist(), settings.faces.size, settings.backbone.channels)
    reference = build_backbone(settings.backbone, image_size=settings.faces.size).predict_on_batch(faces)
    np.testing.assert_allclose(vectors, reference, rtol=1e-3, atol=1e-3)
    again = embed.run(settings, aligned, out)
    assert (again.shards_written, again.shards_skipped) == (0, 1)
    # Another input size is another backbone identity: recomputed, never mixed with the cache.
    bigger = settings.model_copy(update={"backbone": settings.backbone.model_copy(update={"input_size": 64})})
    rebuilt = embed.run(bigger, aligned, out)
    assert rebuilt.shards_written == 1
