"""`ferray demo`: the main job on the bundled sample, local Ray, local folders."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from ferray import ingest
from ferray.config import Settings
from ferray.shards import Summary

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The FER-2013 sample shipped inside the package (a few dozen real faces, image-folder layout)."""
    return Path(str(resources.files("ferray") / "assets" / "fer2013-sample.zip"))


def run(settings: Settings, out: str) -> Summary:
    target = Path(out).resolve()
    summary = ingest.run(settings, "fer2013", str(sample_path()), str(target / "ingested"))
    log.info("demo: ingested shards are in %s", target / "ingested")
    return summary
