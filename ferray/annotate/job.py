"""What an annotation run is pinned to: the model (resolved once on the driver), face settings and the run key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass

from ferray.config import AnnotateSettings, FacesSettings, StorageSettings
from ferray.data import io

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """The artifact a run uses: resolved once on the driver (a registry's current version is pinned)."""

    uri: str  # folder, or `….keras` file, that ferray.model.artifact.load takes
    version: str
    face_size: int
    face_color: str
    flip_tta: bool = False  # the artifact's own `inference.flip_tta`
    sha256: str = ""  # of model.keras; set when annotate.runtime is tflite (the LiteRT graph's key)
    lite_uri: str | None = None  # the LiteRT graph found on the driver; None: the labeller exports it
    lite_precision: str = "float32"  # the graph's precision: annotate.lite_precision, `auto` resolved
    lite_choice: str | None = None  # the artifact's own `inference.lite_precision`, if it names one
    has_cascade: bool = False  # the artifact names a cascade (`inference.cascade`, ferray.model.cascade)


def resolve_model(model: str, storage: StorageSettings) -> ModelRef:
    """MODEL → the artifact and its `ferray.json`, without loading Keras on the driver. `MODEL#member_N` is
    one member of an ensemble, with the TTA and temperature it had alone."""
    from ferray.model import artifact
    from ferray.model.names import split_member
    from ferray.model.registry import RegistryError, resolve

    whole, _ = split_member(model)
    try:
        target = str(artifact.default_model_dir()) if whole == artifact.DEFAULT else resolve(whole, storage)
    except RegistryError as error:
        raise artifact.ModelError(str(error)) from None
    target += model[len(whole):]  # the `#member_N`, if any
    folder, model_uri = artifact.files(target)
    if not io.exists(model_uri, storage) or not io.exists(io.join(folder, artifact.META_FILE), storage):
        raise artifact.ModelError(f"no model at {model}: need {artifact.MODEL_FILE} and {artifact.META_FILE}")
    # Here, on the driver: not as a failed actor once Ray has started.
    artifact.check_labels(model, io.read_json(io.join(folder, artifact.META_FILE), storage))
    _, meta = artifact.read_meta(target, storage)
    version = artifact.Artifact(uri=folder, model=None, meta=meta).version
    inference = meta.get("inference", {})
    return ModelRef(target, version, int(meta.get("face_size", 48)), str(meta.get("face_color", "gray")),
                    bool(inference.get("flip_tta", False)), lite_choice=inference.get("lite_precision"),
                    has_cascade=bool(inference.get("cascade")))


def with_lite(model: ModelRef, settings: AnnotateSettings, storage: StorageSettings) -> ModelRef:
    """The model with its LiteRT graph looked up (annotate.runtime tflite) at its precision (`auto`: the one
    the artifact names, checked against Keras when it was made; else float32). A graph missing here is
    exported by the labeller; int8 needs calibration faces: the artifact's own, or an export beforehand."""
    from ferray.model import artifact, cascade, lite

    if settings.runtime != "tflite":
        return model
    precision = settings.lite_precision if settings.lite_precision != "auto" else (model.lite_choice or "float32")
    folder, _ = artifact.files(model.uri)
    calibrated = io.exists(io.join(folder, lite.CALIBRATION_FILE), storage)
    if precision == cascade.PRECISION:
        if not model.has_cascade:
            raise artifact.ModelError(f"{model.uri} names no cascade (`inference.cascade`): make one with "
                                      f"`python -m ferray.model.cascade MODEL ALIGNED`, or choose another lite_precision")
        if calibrated:  # the members' graphs are found or exported by the labeller
            folder, sha = lite.graph_key(model.uri, storage)
            return dataclasses.replace(model, sha256=sha, lite_uri=None, lite_precision=precision)
        if settings.lite_precision == cascade.PRECISION:
            raise artifact.ModelError(f"{model.uri} has a cascade but no {lite.CALIBRATION_FILE} to calibrate its int8 "
                                      f"passes: copy it with the model, or set annotate.lite_precision: float32")
        # The artifact's two files alone (SPEC's model artifact): the same labels, at the whole model's cost.
        log.warning("annotate: %s names a cascade but has no %s: labelling with the whole float32 graph",
                    model.uri, lite.CALIBRATION_FILE)
        precision = "float32"
    folder, sha = lite.graph_key(model.uri, storage, precision)
    found = lite.find(folder, sha, precision, storage)  # type: ignore[arg-type]
    if found is None and precision in lite.NEEDS_CALIBRATION and not calibrated:
        raise artifact.ModelError(f"no int8 graph of {model.uri}: export one with `python -m ferray.model.lite "
                                  f"{model.uri} --precision int8 --calibration ALIGNED_SHARDS`")
    return dataclasses.replace(model, sha256=sha, lite_uri=found, lite_precision=precision)


def face_settings(faces: FacesSettings, model: ModelRef) -> FacesSettings:
    """Faces as the model was trained on them; annotation keeps every face and never guesses one."""
    return faces.for_command("annotate").model_copy(
        update={"size": model.face_size, "color": model.face_color, "fallback": "none", "keep": "all"})


def run_key(model: ModelRef, faces: FacesSettings, settings: AnnotateSettings) -> str:
    """What output rows depend on: the stage itself, the model version and the settings that change rows or units."""
    from ferray.annotate.stage import AnnotateStage

    knobs = {
        "stage": AnnotateStage.identity(),
        "model_version": model.version,
        "faces": faces.model_dump(mode="json"),
        "sampling": {k: getattr(settings, k) for k in ("fps", "every_nth", "segment_seconds", "max_faces")},
        "detect_max_side": settings.detect_max_side,
        # The mirrored pass as it will run: the model's own choice unless the settings override it.
        "flip_tta": model.flip_tta if settings.flip_tta is None else settings.flip_tta,
        "detect": {"upsample": settings.upsample, "upsample_below": settings.upsample_below},
    }
    if settings.runtime != "keras":  # its own probabilities (the Keras key stays what it was)
        knobs["runtime"] = {"runtime": settings.runtime, "precision": model.lite_precision}
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, resolved on the driver (workers never read the environment)."""

    source: str
    out: str
    storage: StorageSettings
    faces: FacesSettings
    settings: AnnotateSettings
    model: ModelRef
    run_key: str
