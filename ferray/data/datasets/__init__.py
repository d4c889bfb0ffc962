"""Dataset readers: one module per layout, each turning a listed source into ingest entries."""

from __future__ import annotations

from ferray.data.datasets import ckplus, fer2013, folder, jaffe, rafdb
from ferray.data.datasets.base import Entry, Listing, Reader

READERS: dict[str, Reader] = {
    "fer2013": fer2013.read_images,
    "fer2013-csv": fer2013.read_csv,
    "rafdb": rafdb.read,
    "ckplus": ckplus.read,
    "jaffe": jaffe.read,
    "folder": folder.read,
}

__all__ = ["READERS", "Entry", "Listing", "Reader"]
