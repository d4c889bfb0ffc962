"""The model artifact: `model.keras` (face → backbone → head → 7 probabilities) and `ferray.json`."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ferray import __version__
from ferray.config import Settings, StorageSettings
from ferray.data import io
from ferray.data.schema import LABELS
from ferray.model import head
from ferray.errors import ModelError
from ferray.model import META_FILE, MODEL_FILE

log = logging.getLogger(__name__)

DEFAULT = "default"
# The weights inside a `.keras` zip.
_WEIGHTS_FILE = "model.weights.h5"


def default_model_dir() -> Path:
    """The model shipped inside the package (MODEL `default`)."""
    return Path(str(resources.files("ferray") / "assets" / "default-model"))


def is_default(uri: str) -> bool:
    """Whether `uri` is the shipped model's folder (or its model.keras)."""
    path = Path(uri[:-len(MODEL_FILE)] if uri.endswith(MODEL_FILE) else uri)
    try:
        return path.resolve() == default_model_dir().resolve()
    except (OSError, ValueError):  # an s3:// URI, or a path that cannot be resolved here
        return False


def public_uri(uri: str) -> str:
    """A model's location as outputs record it: the shipped model is `default`, never this install's path."""
    return DEFAULT if uri == DEFAULT or is_default(uri) else uri


def fingerprint(meta: dict[str, Any]) -> str:
    """sha256 of an artifact's ferray.json, its `version` aside.

    The metadata names the backbone weights by sha256, the training data by fingerprint and the run
    by its time and metrics, and holds the inference options (a new calibration is a new model), so it
    tells artifacts apart on any storage without reading model.keras.
    """
    body = {key: value for key, value in meta.items() if key != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def version_of(uri: str, meta: dict[str, Any]) -> str:
    """What annotation rows call a model: ferray.json's own `version` when it names one, else
    `<name>-<fingerprint prefix>`: `default` for the shipped model, otherwise the artifact's folder
    name (a registry version, or MODEL_OUT's last part)."""
    named = meta.get("version")
    if isinstance(named, str) and named:
        return named
    folder = uri[:-len(MODEL_FILE)].rstrip("/") if uri.endswith(MODEL_FILE) else uri.rstrip("/")
    name = DEFAULT if public_uri(folder) == DEFAULT else (folder.rsplit("/", 1)[-1] or "model")
    return f"{name}-{fingerprint(meta)[:12]}"


def default_version() -> str:
    """The shipped model's version (`ferray --version`), or why there is none."""
    meta_file = default_model_dir() / META_FILE
    if not meta_file.is_file():
        return "none shipped in this install"
    return version_of(str(default_model_dir()), json.loads(meta_file.read_text()))


def assemble(backbone: Any, head_weights: Sequence[np.ndarray]) -> Any:
    """One Keras 3 model: raw aligned face → frozen backbone → the trained head (dropout off)."""
    import keras

    from ferray.model.head import head_from_weights

    top = head_from_weights(keras, head_weights)
    inputs = keras.Input(shape=backbone.input_shape[1:], name="face")
    return keras.Model(inputs, top(backbone(inputs)), name="ferray")


def metadata(settings: Settings, backbone_meta: dict[str, Any], metrics: dict[str, Any], data_fingerprint: str,
             inference: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ferray.json`: what the model is, what it was trained on, how well it did, how to run it."""
    return {
        "format": "ferray-model/1",
        "labels": list(LABELS),
        "face_size": settings.faces.size,
        "face_color": settings.faces.color,
        "backbone": backbone_meta,
        "weights_source": backbone_meta.get("weights_source"),
        "weights_sha256": backbone_meta.get("weights_sha256"),
        "training_data_fingerprint": data_fingerprint,
        "experiment": settings.config_file,
        "metrics": metrics,
        "inference": {"flip_tta": False, "temperature": 1.0, **(inference or {})},
        "ferray_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


WeightStorage = Literal["float32", "float16"]


def save(model: Any, meta: dict[str, Any], uri: str, storage: StorageSettings,
         weights: WeightStorage = "float32") -> int:
    """Write `model.keras`, then `ferray.json` (the artifact is complete once its metadata exists);
    return model.keras's size in bytes. `weights="float16"`: see `narrow_weights`."""
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / MODEL_FILE
        model.save(local)
        if weights == "float16":
            narrow_weights(local)
        data = local.read_bytes()
        io.write_bytes_atomic(io.join(uri, MODEL_FILE), data, storage)
    io.write_json(io.join(uri, META_FILE), meta, storage)
    return len(data)


def narrow_weights(model_file: Path) -> None:
    """Store a `.keras` file's float32 kernels (arrays of 2+ dimensions) as float16, in place.

    Half the file for a rounding of ~1e-3 relative (labels agree on >99.8% of FER-2013). Keras widens
    each array to its float32 variable at load, so the file still loads with `keras.saving.load_model`
    in safe mode and computes in float32; biases and BatchNorm statistics stay float32.
    """
    import h5py

    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(model_file) as archive:
            names = archive.namelist()
            archive.extractall(folder)
        weights = Path(folder) / _WEIGHTS_FILE
        narrowed = Path(folder) / "narrowed.h5"
        with h5py.File(weights, "r") as source, h5py.File(narrowed, "w") as target:
            def copy(name: str, item: Any) -> None:
                if isinstance(item, h5py.Dataset):
                    array = item[()]
                    if array.dtype == np.float32 and array.ndim >= 2:
                        array = array.astype(np.float16)
                    target.create_dataset(name, data=array)
                else:
                    target.require_group(name)
                target[name].attrs.update(dict(item.attrs))

            source.visititems(copy)
            target.attrs.update(dict(source.attrs))
        narrowed.replace(weights)
        with zipfile.ZipFile(model_file, "w") as archive:
            for name in names:
                archive.write(Path(folder) / name, name)


def apply_inference(raw: Callable[[np.ndarray], np.ndarray], faces: np.ndarray, meta: dict[str, Any],
                    flip_tta: bool | None = None) -> np.ndarray:
    """`ferray.json`'s inference recipe around a model's raw probabilities: the mean with the mirrored
    faces' (flip TTA; `flip_tta` overrides the artifact's choice, None keeps it), then the class offsets
    and temperature.
    One function for every runtime (Keras, LiteRT), so that they differ only in the raw numbers."""
    inference = meta.get("inference", {})
    probs = raw(faces)
    if inference.get("flip_tta") if flip_tta is None else flip_tta:
        probs = (probs + raw(faces[:, :, ::-1])) / 2.0
    return head.apply_recipe(probs, inference).astype(np.float32)


@dataclass
class Artifact:
    """A loaded model and its metadata."""

    uri: str
    model: Any
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return version_of(self.uri, self.meta)

    def predict(self, faces: np.ndarray, batch_size: int = 256, flip_tta: bool | None = None) -> np.ndarray:
        """Probabilities for raw aligned faces (N, s, s, c), applying the artifact's TTA and temperature.

        `flip_tta` overrides the artifact's own choice (None keeps it)."""
        return apply_inference(lambda x: self._predict(x, batch_size), faces, self.meta, flip_tta)

    def _predict(self, faces: np.ndarray, batch_size: int) -> np.ndarray:
        parts = [np.asarray(self._serve(np.ascontiguousarray(faces[i : i + batch_size], np.float32)))
                 for i in range(0, len(faces), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(LABELS)), np.float32)

    @functools.cached_property
    def _serve(self) -> Any:
        """The model as one graph for any batch size: traced once (predict_on_batch traces again for
        the second batch size it sees, about a CPU-second each)."""
        import tensorflow as tf

        spec = tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)
        return tf.function(lambda x: self.model(x, training=False), input_signature=[spec])


def check_labels(uri: str, meta: dict[str, Any]) -> None:
    """Refuse a model whose `ferray.json` does not name ferray's 7 labels in their order."""
    if meta.get("labels") != list(LABELS):
        raise ModelError(f"model {uri} predicts {meta.get('labels')}, ferray's labels are {list(LABELS)}")


def load(uri: str, storage: StorageSettings) -> Artifact:
    """Load MODEL (folder, `s3://`, registry, or `default`) in Keras safe mode; check its labels.

    `MODEL#member_N` is member N of an ensemble MODEL as a model of its own (with the TTA and temperature it
    had alone), so an ensemble's members can join another ensemble or teach without their own folders."""
    from ferray.model.names import split_member

    target, member = split_member(uri)
    if member is not None:
        return _member(load(target, storage), member)
    return _load(uri, storage)


def _member(whole: Artifact, index: int) -> Artifact:
    from ferray.model.ensemble import MEMBER_PREFIX, members

    meta = member_meta(whole.uri, whole.meta, index)
    nested = {layer.name: layer for layer in members(whole.model) if layer.name.startswith(MEMBER_PREFIX)}
    name = f"{MEMBER_PREFIX}{index}"
    if name not in nested:
        raise ModelError(f"{whole.uri} has no {name} (members: {', '.join(sorted(nested)) or 'none, not an ensemble'})")
    return Artifact(uri=f"{whole.uri}#{name}", model=nested[name], meta=meta)


def files(uri: str) -> tuple[str, str]:
    """(folder, model file) of a resolved artifact URI: its folder or its `.keras`, with or without
    `#member_N` (a member lives in its ensemble's files)."""
    from ferray.model.names import split_member

    target = split_member(uri)[0]
    if target.endswith(".keras"):
        return target.rsplit("/", 1)[0], target
    return target, io.join(target, MODEL_FILE)


def read_meta(uri: str, storage: StorageSettings) -> tuple[str, dict[str, Any]]:
    """(folder, `ferray.json`) of a resolved artifact URI without Keras; for `MODEL#member_N` the metadata
    that member has as a model of its own (its TTA, temperature and version)."""
    from ferray.model.names import split_member

    folder, _ = files(uri)
    meta = io.read_json(io.join(folder, META_FILE), storage)
    member = split_member(uri)[1]
    return folder, (meta if member is None else member_meta(uri, meta, member))


def member_meta(uri: str, whole: dict[str, Any], index: int) -> dict[str, Any]:
    """The `ferray.json` member `index` of the ensemble `whole` has as a model of its own (read from the
    ensemble's metadata alone, so the annotate driver resolves `MODEL#member_N` without Keras)."""
    from ferray.model.ensemble import MEMBER_PREFIX

    described = whole.get("members") or []
    if index >= len(described):
        names = ", ".join(f"{MEMBER_PREFIX}{k}" for k in range(len(described))) or "none, not an ensemble"
        raise ModelError(f"{uri} has no {MEMBER_PREFIX}{index} (members: {names})")
    own = described[index]
    meta = {key: value for key, value in whole.items() if key not in ("members", "metrics", "inference")}
    meta.update(
        version=own["version"], experiment=own.get("experiment"), backbone=whole["backbone"]["members"][index],
        inference=own.get("inference") or {}, metrics={"val_accuracy": own.get("val_accuracy"),
                                                       "test_accuracy": own.get("test_accuracy")},
        # What names it wherever it is read from: the ensemble it was taken from, and its own fingerprint there.
        member_of={"fingerprint": fingerprint(whole), "member": index, "member_fingerprint": own["fingerprint"]},
    )
    return meta


def _load(uri: str, storage: StorageSettings) -> Artifact:
    from ferray.model.registry import RegistryError, resolve

    try:
        target = str(default_model_dir()) if uri == DEFAULT else resolve(uri, storage)
    except RegistryError as error:
        raise ModelError(str(error)) from None
    model_uri = target if target.endswith(".keras") else io.join(target, MODEL_FILE)
    folder = model_uri.rsplit("/", 1)[0]
    meta_uri = io.join(folder, META_FILE)
    if not io.exists(model_uri, storage) or not io.exists(meta_uri, storage):
        hint = " (no default model is shipped in this install)" if uri == DEFAULT else ""
        raise ModelError(f"no model at {uri}: need {MODEL_FILE} and {META_FILE}{hint}")
    meta = io.read_json(meta_uri, storage)
    check_labels(uri, meta)
    local = io.fetch_cached(model_uri, storage)
    # Keras (and TensorFlow's start-up chatter) only after the checks: a wrong MODEL fails in one line.
    import keras

    try:
        model = keras.saving.load_model(local, compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError) as error:
        raise ModelError(f"cannot load {model_uri} in safe mode: {' '.join(str(error).split())[:300]}") from None
    return Artifact(uri=folder, model=model, meta=meta)


def training_datasets(source: str, storage: StorageSettings) -> list[str]:
    """Which datasets an embedded input holds (so reports can name the paper's comparison)."""
    import pyarrow.compute as pc

    names: set[str] = set()
    for uri in io.completed_shards(source, storage):
        names.update(v for v in pc.unique(io.read_parquet(uri, storage, ["dataset"])["dataset"]).to_pylist() if v)
    return sorted(names)


def from_training(settings: Settings, result: Any, model_out: str, source: str) -> Artifact:
    """After `ferray train`: the trained head on the backbone that made the embeddings → MODEL_OUT."""
    from ferray.model.backbones import backbone_fingerprint, backbone_metadata, build_backbone, resolve_weights
    from ferray.training.train import load_head_weights

    storage = settings.storage
    fetch = functools.partial(io.fetch_cached, storage=storage)
    weights = resolve_weights(settings.backbone, fetch)
    expected = backbone_fingerprint(settings.backbone, weights, image_size=settings.faces.size)
    if result.backbone and result.backbone != expected:
        raise ModelError(f"the embeddings were made by {result.backbone}; settings describe {expected} "
                         "(set backbone.* and faces.size as they were for `ferray embed`)")
    backbone = build_backbone(settings.backbone, fetch, weights=weights, image_size=settings.faces.size)
    model = assemble(backbone, load_head_weights(model_out, storage))
    metrics = {"val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "rows": result.rows,
               "skipped": result.skipped, "seconds": result.seconds, "head": result.head, "train": result.train}
    meta = metadata(settings, backbone_metadata(settings.backbone, weights, settings.faces.size), metrics,
                    result.data_fingerprint)
    meta["training_dataset"] = training_datasets(source, storage)
    save(model, meta, model_out, storage)
    log.info("model artifact written to %s", model_out)
    return Artifact(uri=model_out, model=model, meta=meta)
