"""docs/configuration.md is what tools/config_reference.py prints from ferray/config.py: the reference is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ferray.config import Settings

REPO = Path(__file__).resolve().parents[1]


def _reference() -> object:
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_current() -> None:
    printed = _reference().render()  # type: ignore[attr-defined]
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == printed, "docs/configuration.md is stale: python tools/config_reference.py > docs/configuration.md"


def test_every_setting_has_a_row_with_its_default() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    for section, info in Settings.model_fields.items():
        for name in info.annotation.model_fields:  # type: ignore[union-attr]
            assert f"| `{section}.{name}` |" in page, f"{section}.{name}"
    row = next(line for line in page.splitlines() if line.startswith("| `annotate.overlays` |"))
    assert "`false`" in row and "OUT/_overlays/" in row, "a Field description is used as the setting's text"
    assert "*Measured:*" in next(line for line in page.splitlines() if line.startswith("| `faces.upsample` |"))
