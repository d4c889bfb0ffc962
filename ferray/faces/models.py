"""Dlib model files: the ones `face-recognition-models` ships, or an override by path or URI."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferray.errors import FerrayError

# Turns a remote model URI (`s3://…`) into a local file; supplied by the caller so that this
# package never touches storage (ferray.data.io owns that).
Fetch = Callable[[str], "str | Path"]

# Files shipped by the `face-recognition-models` package, under its `models/` folder.
LANDMARK_MODEL_FILES: dict[int, str] = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
_MODELS_PACKAGE = "face_recognition_models"


class MissingModelError(FerrayError, FileNotFoundError):
    """A Dlib model file could not be found or loaded; the message names the setting to fix."""


def bundled_models_dir() -> Path | None:
    """The `models/` folder of `face-recognition-models`, found without importing the package.

    Its `__init__` imports `pkg_resources`, which modern environments lack, so the package is
    located through its import spec (which does not execute it) or its installed file list.
    """
    spec = importlib.util.find_spec(_MODELS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = Path(location) / "models"
            if folder.is_dir():
                return folder
    try:
        files = importlib.metadata.files("face-recognition-models") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == LANDMARK_MODEL_FILES[5] and file.parent.name == "models":
            return Path(str(file.locate())).parent
    return None


def resolve_model(filename: str, override: str | None, setting: str, fetch: Fetch | None = None) -> Path:
    """Local path of a model: the configured override (path or URI via `fetch`), else the bundled file."""
    if override:
        if "://" in override:
            if fetch is None:
                raise MissingModelError(f"faces.{setting}={override} is remote and no fetcher was given")
            path = Path(fetch(override))
        else:
            path = Path(override).expanduser()
        if not path.is_file():
            raise MissingModelError(f"faces.{setting}: model file not found: {path}")
        return path
    folder = bundled_models_dir()
    if folder is None or not (folder / filename).is_file():
        raise MissingModelError(
            f"Dlib model {filename} not found: install face-recognition-models or set faces.{setting}"
        )
    return folder / filename


def load_model(factory: Callable[[str], Any], path: Path, setting: str) -> Any:
    try:
        return factory(str(path))
    except RuntimeError as error:  # Dlib's deserialisation error for a wrong or damaged file
        raise MissingModelError(f"faces.{setting}: cannot load {path}: {str(error).strip()[:200]}") from None
