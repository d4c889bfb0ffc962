"""The artifact as a LiteRT (TFLite) graph for annotation: exported once per model (keyed by the sha256 of
`model.keras`), cached, and run by `ai-edge-litert`'s interpreter without importing TensorFlow."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from ferray import logs
from ferray.config import StorageSettings
from ferray.data import io
from ferray.errors import ModelError
from ferray.model import CALIBRATION_FILE
from ferray.model.artifact import apply_inference

log = logging.getLogger(__name__)

# Faces a graph runs at once: a small batch's activations stay in the core's cache. Float32 members of the
# shipped model take 15-17% less CPU a face at 12 than at 256, int8 ones 2-4% (bench/lite_batch.py);
# another batch size costs the interpreter a re-plan of ~0.02 ms, so a remainder runs as it is.
BATCH = 12

Precision = Literal["float32", "float16", "int8"]
# int8 needs representative faces to calibrate its activations; the float graphs need nothing but the model.
NEEDS_CALIBRATION: frozenset[str] = frozenset({"int8"})
# How a graph is made from the artifact, part of its key: a graph made another way (before `ferray.model.lean`)
# is not taken for this one.
GRAPH_FORMAT = "lean-1"
# An artifact may carry its own calibration faces (raw uint8, N×s×s×c, CALIBRATION_FILE), so that its int8
# graph can be exported on any machine, with no dataset at hand, and comes out the same wherever it is made.


def model_sha256(model_uri: str, storage: StorageSettings) -> str:
    """sha256 of `model.keras`: what a LiteRT graph is keyed by (a retrained model gets its own graph)."""
    from ferray.model.names import file_sha256

    return file_sha256(io.fetch_cached(model_uri, storage))


def graph_key(model_uri: str, storage: StorageSettings, precision: str = "float32") -> tuple[str, str]:
    """(the artifact's folder, what its graph at `precision` is keyed by): the sha256 of model.keras's sha256
    and GRAPH_FORMAT, and for `MODEL#member_N` the member's name, so a member's graph sits beside its
    ensemble's. An int8 graph calibrated on the artifact's own faces is keyed by those too: other
    calibration faces make another graph."""
    import hashlib

    from ferray.model import artifact
    from ferray.model.names import file_sha256, split_member

    target, member = split_member(model_uri)
    folder, model_file = artifact.files(model_uri)
    sha = model_sha256(model_file, storage)
    parts = [sha, GRAPH_FORMAT] + ([] if member is None else [model_uri[len(target):]])
    calibration = io.join(folder, CALIBRATION_FILE)
    if precision in NEEDS_CALIBRATION and io.exists(calibration, storage):
        parts.append(file_sha256(io.fetch_cached(calibration, storage)))
    return folder, hashlib.sha256("".join(parts).encode()).hexdigest()


def lite_name(sha256: str, precision: Precision) -> str:
    return f"model-{sha256[:16]}.{precision}.tflite"


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/ferray/lite"))


def candidates(folder: str, sha256: str, precision: Precision, cache_dir: Path | None = None) -> list[str]:
    """Where a model's graph may be, in order: beside the artifact (written by `export` when it can write
    there), then this machine's cache. Never inside the package: the shipped model's folder may be
    read-only, and a dev checkout would gain an 18 MB untracked file."""
    from ferray.model.artifact import default_model_dir

    name = lite_name(sha256, precision)
    cached = str((cache_dir or default_cache_dir()) / name)
    if Path(folder).resolve() == default_model_dir().resolve():
        return [cached]
    return [io.join(folder, name), cached]


def find(folder: str, sha256: str, precision: Precision, storage: StorageSettings,
         cache_dir: Path | None = None) -> str | None:
    """The first existing graph of the model at this precision, or None."""
    return next((uri for uri in candidates(folder, sha256, precision, cache_dir) if io.exists(uri, storage)), None)


def save_calibration(folder: str, faces: np.ndarray, storage: StorageSettings) -> None:
    """Store int8 calibration faces beside an artifact (CALIBRATION_FILE)."""
    import io as pyio

    buffer = pyio.BytesIO()
    np.savez_compressed(buffer, faces=np.asarray(faces, np.uint8))
    io.write_bytes_atomic(io.join(folder, CALIBRATION_FILE), buffer.getvalue(), storage)


def store_calibration(folder: str, faces: np.ndarray, count: int, storage: StorageSettings) -> np.ndarray:
    """`sample_calibration` of `faces`, stored beside the artifact at `folder` unless it holds them already
    (the file, and the int8 graphs keyed by it, then stay as they are); returns them."""
    chosen = sample_calibration(faces, count)
    stored = load_calibration(folder, storage)
    if stored is None or not np.array_equal(stored, chosen.astype(np.float32)):
        save_calibration(folder, chosen, storage)
    return chosen


def load_calibration(folder: str, storage: StorageSettings) -> np.ndarray | None:
    """The artifact's own calibration faces (float32, as the graph takes them), or None."""
    import io as pyio

    uri = io.join(folder, CALIBRATION_FILE)
    if not io.exists(uri, storage):
        return None
    with np.load(pyio.BytesIO(io.read_bytes(uri, storage))) as stored:
        return stored["faces"].astype(np.float32)


def convert(model: Any, precision: Precision, representative: np.ndarray | None = None) -> bytes:
    """The Keras model as a LiteRT flatbuffer (float input and output at every precision), made `lean`.

    Through a SavedModel: converting a tf.function over Keras 3 variables keeps them as resource
    variables that the interpreter cannot read. `representative`: raw faces (N, s, s, c) for int8.
    """
    import keras
    import tensorflow as tf

    from ferray.model.lean import lean

    model = lean(model)

    with tempfile.TemporaryDirectory() as folder:
        # An explicit inference-mode endpoint: `model.export` traces the call with `training` unset, and a
        # loaded fine-tuned model then keeps its head's dropout (random ops LiteRT does not have).
        archive = keras.export.ExportArchive()
        archive.track(model)
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
        archive.write_out(folder, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if precision != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if precision == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif precision == "int8":
            if representative is None or not len(representative):
                raise ModelError("an int8 graph needs representative faces to calibrate (see `ferray.model.lite`)")
            faces = np.ascontiguousarray(representative, np.float32)
            converter.representative_dataset = lambda: ([faces[i : i + 1]] for i in range(len(faces)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return bytes(converter.convert())


def export(model_uri: str, storage: StorageSettings, precision: Precision = "float32",
           representative: np.ndarray | None = None, cache_dir: Path | None = None, force: bool = False) -> str:
    """The model's graph at `precision`, converted unless one exists (reruns for any artifact: keyed by
    sha256). Written beside the artifact when that folder takes it, else into this machine's cache.
    int8 without `representative` calibrates on the artifact's own faces (CALIBRATION_FILE) when it has them."""
    from ferray.model import artifact

    folder, sha = graph_key(model_uri, storage, precision)
    found = None if force else find(folder, sha, precision, storage, cache_dir)
    if found:
        return found
    with converting(lite_name(sha, precision), cache_dir):
        # Another process of this machine may have written it while this one waited.
        found = None if force else find(folder, sha, precision, storage, cache_dir)
        if found:
            return found
        if precision in NEEDS_CALIBRATION and representative is None:
            representative = load_calibration(folder, storage)
        loaded = artifact.load(model_uri, storage)
        data = convert(loaded.model, precision, representative)
        for uri in candidates(folder, sha, precision, cache_dir):
            try:
                # Written then renamed: processes of other machines exporting it at once each leave a whole file.
                io.write_bytes_atomic(uri, data, storage)
            except OSError as error:  # a read-only install: the next place
                log.info("lite: cannot write %s (%s)", uri, error)
                continue
            log.info("lite: %s graph of %s (%d KiB) written to %s", precision, model_uri, len(data) // 1024, uri)
            return uri
    raise ModelError(f"nowhere to write the {precision} graph of {model_uri}: {candidates(folder, sha, precision, cache_dir)}")


@contextmanager
def converting(name: str, cache_dir: Path | None = None) -> Iterator[None]:
    """Held while this machine converts the graph `name`: annotate's actors start together, and each would
    otherwise import TensorFlow and convert the same graphs (a minute of CPU each for a cascade); the others
    wait for the first one's file. Without a writable cache folder there is no lock, only the duplicate work."""
    folder = cache_dir or default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / f"{name}.lock", "a")
    except OSError as error:
        log.info("lite: no lock for converting %s (%s)", name, error)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


class LiteModel:
    """A LiteRT graph applied like Artifact.predict: the same flip TTA and temperature (apply_inference)."""

    def __init__(self, uri: str, meta: dict[str, Any], storage: StorageSettings, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.uri, self.meta = uri, meta
        self.interpreter = Interpreter(model_path=io.fetch_cached(uri, storage), num_threads=max(1, threads))
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = -1

    def predict(self, faces: np.ndarray, batch_size: int = BATCH, flip_tta: bool | None = None) -> np.ndarray:
        """Probabilities for raw aligned faces (N, s, s, c)."""
        return apply_inference(lambda x: self._raw(x, batch_size), faces, self.meta, flip_tta)

    def raw(self, faces: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """The graph's own probabilities, no TTA, offsets or temperature."""
        return self._raw(faces, batch_size)

    def member_raw(self, faces: np.ndarray, flip: bool, batch_size: int = BATCH) -> np.ndarray:
        """The graph's probabilities with the mirrored faces' averaged in when `flip`: one member's share of
        an ensemble's mean, before the ensemble's offsets and temperature."""
        probs = self._raw(faces, batch_size)
        return (probs + self._raw(np.ascontiguousarray(faces[:, :, ::-1]), batch_size)) / 2.0 if flip else probs

    def _raw(self, faces: np.ndarray, batch_size: int) -> np.ndarray:
        parts = [self._invoke(np.ascontiguousarray(faces[i : i + batch_size], np.float32))
                 for i in range(0, len(faces), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.output["shape"][-1])), np.float32)

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"], list(batch.shape))
            logs.allocate_quietly(self.interpreter)
            self._batch = len(batch)
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output["index"]), np.float32)


class CascadeModel:
    """`ferray.model.cascade` at annotate time: the members' graphs run pass by pass on the faces still unsure;
    predicts like LiteModel."""

    def __init__(self, cascade: Any, graphs: dict[tuple[int, str], LiteModel], meta: dict[str, Any]) -> None:
        self.cascade, self.graphs, self.meta = cascade, graphs, meta
        self.members = len(meta.get("members") or [])
        self.uri = next(iter(graphs.values())).uri

    @classmethod
    def load(cls, model_uri: str, cascade: Any, meta: dict[str, Any], storage: StorageSettings, threads: int = 1) -> CascadeModel:
        """The cascade of the ensemble at `model_uri` with every member graph it may run, found or converted here."""
        from ferray.model.ensemble import MEMBER_PREFIX

        graphs = {(k, p): LiteModel(export(f"{model_uri}#{MEMBER_PREFIX}{k}", storage, p), meta, storage, threads)  # type: ignore[arg-type]
                  for k, p in cascade.graphs(len(meta.get("members") or []))}
        return cls(cascade, graphs, meta)

    def predict(self, faces: np.ndarray, batch_size: int = BATCH, flip_tta: bool | None = None) -> np.ndarray:
        from ferray.model import cascade

        inference = self.meta.get("inference", {})
        flip = bool(inference.get("flip_tta") if flip_tta is None else flip_tta)
        probs, _ = cascade.run(self.cascade, len(faces), self.members,
                               lambda k, p, rows: self.graphs[(k, p)].member_raw(faces[rows], flip, batch_size), inference)
        return probs


def sample_calibration(faces: np.ndarray, count: int) -> np.ndarray:
    """`count` of `faces` drawn at random (seed 0) in their order: what calibrates an int8 graph, the same
    for the same data wherever the graph is made (`ensemble.calibration_faces` sets how many)."""
    chosen = np.random.default_rng(0).choice(len(faces), min(count, len(faces)), replace=False)
    return faces[np.sort(chosen)]


def calibration_faces(source: str, storage: StorageSettings, count: int, split: str = "train") -> np.ndarray:
    """Raw faces (N, s, s, c) for int8 calibration: `sample_calibration` of the ok rows of `split` in aligned
    shards (shards hold rows in a fixed order, so the same data gives the same faces)."""
    import cv2
    import pyarrow.compute as pc

    from ferray.model.embed import decode_faces

    rows: list[bytes] = []
    for uri in io.completed_shards(source, storage):
        table = io.read_parquet(uri, storage, ["split", "status", "face"])
        keep = pc.and_(pc.equal(table["split"], split), pc.equal(table["status"], "ok"))
        rows += [face for face in table["face"].filter(keep).to_pylist() if face]
    if not rows:
        raise ModelError(f"no ok `{split}` faces under {source} to calibrate an int8 graph with")
    chosen = [rows[i] for i in sample_calibration(np.arange(len(rows)), count)]
    pixels = cv2.imdecode(np.frombuffer(chosen[0], np.uint8), cv2.IMREAD_UNCHANGED)
    size, channels = pixels.shape[0], 1 if pixels.ndim == 2 else pixels.shape[2]
    return decode_faces(chosen, size, channels)


def main(argv: list[str] | None = None) -> None:
    """`python -m ferray.model.lite MODEL [--precision P] [--calibration ALIGNED]`: export, print the path."""
    import argparse

    from ferray.config import load_settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="model folder, `….keras`, registry name or `default`")
    parser.add_argument("--precision", choices=["float32", "float16", "int8"], default="float32")
    parser.add_argument("--calibration", help="aligned shards whose train faces calibrate int8")
    parser.add_argument("--calibration-faces", type=int, help="how many (default: ensemble.calibration_faces)")
    parser.add_argument("--force", action="store_true", help="convert again even when a graph exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ferray.annotate.job import resolve_model

    settings = load_settings()
    storage = settings.storage.resolved()
    ref = resolve_model(args.model, storage)
    count = args.calibration_faces or settings.ensemble.calibration_faces
    faces = calibration_faces(args.calibration, storage, count) if args.calibration else None
    print(export(ref.uri, storage, args.precision, faces, force=args.force))


if __name__ == "__main__":
    main()
