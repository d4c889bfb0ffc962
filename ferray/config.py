"""The settings tree: defaults < YAML file (`--config`) < `FERRAY_<SECTION>__<FIELD>` environment."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ferray.errors import ConfigError

# The YAML file of the current load; a context variable keeps `load_settings` re-entrant.
_YAML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ferray_yaml", default=None)


class Section(BaseModel):
    """Base of every settings section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Placement(Section):
    """Ray resources per actor of a section's stage (embed's actors, annotate's), declared once."""

    # On CPU one thread per actor and one actor per core beat one actor with many threads
    # (TensorFlow's thread pools oversubscribe otherwise).
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)


class StorageSettings(Section):
    """Object-storage access; unset fields fall back to the standard AWS environment (`load_settings`
    resolves them once, on the driver)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anon: bool = False

    def resolved(self, environ: dict[str, str] | None = None) -> StorageSettings:
        """Fill unset fields from AWS_* variables, once on the driver, so workers never read env."""
        env = os.environ if environ is None else environ

        def pick(current: Any, *names: str) -> Any:
            if current is not None:
                return current
            for name in names:
                if env.get(name):
                    return env[name]
            return None

        def secret(current: SecretStr | None, name: str) -> SecretStr | None:
            return current if current is not None else (SecretStr(env[name]) if env.get(name) else None)

        return self.model_copy(
            update={
                "endpoint_url": pick(self.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                "region": pick(self.region, "AWS_REGION", "AWS_DEFAULT_REGION"),
                "access_key_id": secret(self.access_key_id, "AWS_ACCESS_KEY_ID"),
                "secret_access_key": secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                "session_token": secret(self.session_token, "AWS_SESSION_TOKEN"),
            }
        )


class RaySettings(Section):
    """Where Ray runs: empty address starts or joins a local Ray; `auto` or `ray://…` a cluster."""

    address: str = ""
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    # Ray Data's progress bars; jobs keep them, tests may turn them off.
    progress_bars: bool = True


class ImageLimits(Section):
    """Guards checked before an image's pixels are decoded (ferray.data.images.open_checked): a file or
    image over either is a `decode:too_large` row, never a worker's memory."""

    max_file_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=100_000_000, ge=1)


class IngestSettings(Section):
    """Dataset ingest: shard size, file guards and the carved validation split."""

    shard_rows: int = Field(default=4096, ge=1, le=1_000_000)
    # Files and images over these are `decode:too_large` rows, refused before their pixels are decoded.
    limits: ImageLimits = ImageLimits()
    # Datasets whose official release has train/test only (RAF-DB) get `val` carved from train.
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # RAF-DB ships aligned 100x100 faces and original photos; `auto` takes aligned when present.
    rafdb_images: Literal["auto", "aligned", "original"] = "auto"


class FacesSettings(Section):
    """Dlib detection and alignment (owned by ferray.faces)."""

    # A name in ferray.faces.DETECTORS. HOG: Dlib's fast CPU frontal detector. MMOD: its CNN detector,
    # more poses, slow without CUDA. YuNet: libfacedetection's small CNN. BlazeFace: MediaPipe's
    # back-camera model, on LiteRT; finds the most faces. blazeface_short: its short-range model in
    # smaller tiles, the same faces found for less detection on the photo bench. blazeface_cascade: the
    # short-range model, and the back-camera one on pictures where it found none. `auto`: each command's
    # own choice (ferray.faces.AUTO_DETECTOR; align: hog, the paper's; annotate: blazeface_cascade).
    detector: str = "auto"
    # Each step doubles the image before detection: it halves the smallest face found and multiplies
    # the detection time; 48×48 face crops need one (figures: docs/settings.md).
    upsample: int = Field(default=1, ge=0, le=4)
    # Dlib's 5-point model is free to use; the 68-point model's training data (iBUG 300-W) is not
    # licensed for commercial use.
    landmarks: Literal[5, 68] = 5
    # Local path or `s3://` URI replacing the bundled face-recognition-models file; for `hog` a
    # custom Dlib .svm detector.
    landmarks_model: str | None = None
    detector_model: str | None = None
    size: int = Field(default=48, ge=8, le=1024)
    # Margin around the landmarks' face box, as a share of it (Dlib's get_face_chip padding).
    padding: float = Field(default=0.25, ge=0.0, le=2.0)
    # Dlib cuts the chip bilinearly at size×chip_scale; a bicubic resize makes it size×size (the
    # paper's resize). 1 = Dlib's chip as is.
    chip_scale: int = Field(default=4, ge=1, le=8)
    color: Literal["gray", "rgb"] = "gray"
    # One row per image (largest face), or one row per face.
    keep: Literal["largest", "all"] = "largest"
    # No face found: use the whole (pre-cropped) frame, or mark the row `align:no_face`.
    fallback: Literal["full_frame", "none"] = "full_frame"
    # Detections narrower than this are ignored (0 = keep all). Above the detector's reach (built-in HOG:
    # 80 px, 40 upsampled once) it also makes detection cheaper: it runs on a copy scaled so that a face
    # this wide is at that reach, and detection's cost falls with the pixels (faces narrower than it,
    # found or not, are not wanted anyway; figures: docs/settings.md).
    min_face_px: int = Field(default=0, ge=0)
    # Detection upsamples the image, so the pixel guard is tighter than ingest's.
    limits: ImageLimits = ImageLimits(max_image_pixels=40_000_000)

    @field_validator("landmarks", mode="before")
    @classmethod
    def _landmarks_from_text(cls, value: Any) -> Any:
        # Environment variables arrive as text, and a Literal of ints refuses "68".
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, value: str) -> str:
        from ferray.faces import DETECTORS  # names only: ferray.faces does not import Dlib

        if value != "auto" and value not in DETECTORS:
            raise ValueError(f"Input should be {' or '.join(repr(name) for name in ('auto', *DETECTORS))}")
        return value

    def for_command(self, command: Literal["align", "annotate"]) -> FacesSettings:
        """These settings with `auto` replaced by the command's detector (what its fingerprints record)."""
        from ferray.faces import AUTO_DETECTOR

        if self.detector != "auto":
            return self
        return self.model_copy(update={"detector": AUTO_DETECTOR[command]})


class BackboneSettings(Placement):
    """Frozen EfficientNet backbone (owned by ferray.model.backbones)."""

    name: str = "efficientnet-lite0"  # a name in ferray.model.BACKBONES
    # Side of the square image the EfficientNet sees; Keras Applications refuse less than 32.
    input_size: int = Field(default=48, ge=32, le=1024)
    # 1: grey faces, replicated to RGB inside the model; 3: colour faces.
    channels: Literal[1, 3] = 1
    # `imagenet` | `none` (random, only when asked) | a local path or `s3://` URI of a weight file
    # | `artifact:<model folder or model.keras>` to reuse the backbone of a ferray model; `artifact:<ensemble>#member_N`
    # that of one member of an ensemble artifact.
    weights: str = Field(default="imagenet", min_length=1)
    # Converted Lite0 weights; None = ~/.cache/ferray/weights.
    cache_dir: str | None = None
    # Keras Applications' cache (holds `models/efficientnetbN_notop.h5`); None = Keras's own.
    keras_cache_dir: str | None = None
    # A Keras download on a cluster whose egress is black-holed would otherwise hang.
    download_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    batch_size: int = Field(default=128, ge=1, le=65536)

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from ferray.model import BACKBONES  # names only: ferray.model does not import Keras

        if value not in BACKBONES:
            raise ValueError(f"Input should be {', '.join(repr(name) for name in BACKBONES)}")
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_from_text(cls, value: Any) -> Any:
        # Environment variables arrive as text, and a Literal of ints refuses "3".
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("weights")
    @classmethod
    def _local_weights_absolute(cls, value: str) -> str:
        # Ray workers start in another directory: a relative path must mean what it meant here.
        from ferray.model import ARTIFACT_PREFIX

        prefix = ARTIFACT_PREFIX if value.startswith(ARTIFACT_PREFIX) else ""
        target = value.removeprefix(prefix)
        if value in ("imagenet", "none") or "://" in target or Path(target).expanduser().is_absolute():
            return value
        return prefix + str(Path(target).resolve())


class EvaluateSettings(Section):
    """`ferray evaluate` and calibration (owned by ferray.evaluate): split, path, plots, bins."""

    # None: `test` where DATA has labelled test rows, else every labelled row; `all`: every labelled row.
    split: Literal["train", "val", "test", "all"] | None = None
    # Classify stored embeddings with the head when their backbone fingerprint is the model's (fast);
    # false always runs the whole model on the aligned faces (e.g. so the artifact's flip TTA applies).
    reuse_embeddings: bool = True
    batch_size: int = Field(default=256, ge=1, le=65536)
    # 15 equal-width confidence bins: the usual ECE (Guo et al. 2017).
    ece_bins: int = Field(default=15, ge=2, le=100)
    # t-SNE is quadratic-ish in rows; a fixed-seed sample keeps the plot minutes-free and repeatable.
    tsne_max_rows: int = Field(default=2000, ge=10, le=20000)
    misclassified_max: int = Field(default=36, ge=1, le=400)
    seed: int = 0
    # The model's training dataset when its ferray.json does not say (chooses the paper's number).
    train_dataset: str | None = None


class AnnotateSettings(Placement):
    """`ferray annotate` (owned by ferray.annotate): sampling, shards, workers."""

    # Video frames sampled per second of video; `every_nth` (when set) takes every Nth frame instead.
    fps: float = Field(default=2.0, gt=0, le=1000)
    every_nth: int | None = Field(default=None, ge=1)
    # Videos are cut into segments of this many seconds so that several workers share a long file.
    segment_seconds: float = Field(default=60.0, gt=0, le=86400)
    # A shard (one output file) holds at most this many units (an image or a video segment) and
    # about this many frames (an image counts one, a segment its sampled frames). A shard is one
    # actor's task: a few seconds of work at most, so that a thousand files keep a node busy. A
    # small SOURCE is cut finer, into about `shards_per_actor` shards per detect actor, so that every
    # CPU works until the end.
    shard_units: int = Field(default=128, ge=1, le=100_000)
    shards_per_actor: int = Field(default=4, ge=1, le=1000)
    shard_frames: int = Field(default=256, ge=1, le=1_000_000)
    # Faces classified per image or frame, largest first; None keeps every face found.
    max_faces: int | None = Field(default=None, ge=1)
    # Detection upsampling. Dlib's HOG sees faces from about 80 px; each faces.upsample step halves
    # that and costs about 4× the detection time. `auto`: detect without upsampling, and again at
    # faces.upsample only in an image or frame where no face was found and whose shorter side is
    # under `upsample_below` px (face crops, thumbnails: where every face is small). A face under
    # ~80 px in a larger picture is then not found. `faces`: every image and frame at faces.upsample.
    upsample: Literal["auto", "faces"] = "auto"
    upsample_below: int = Field(default=160, ge=0, le=100_000)
    # Detection runs on a copy scaled down so that its longer side is at most this many px (None: full
    # size): HOG's cost grows with pixels. A face is then found from about the detector's reach ×
    # (longer side / detect_max_side) px; landmarks and chips always come from the full-size image.
    detect_max_side: int | None = Field(default=1920, ge=160, le=100_000)
    # Images and frames aligned together: detection runs over the group before any landmarks, so that
    # each Dlib model stays in the CPU cache; a group also ends at 33 MP of pixels.
    align_group: int = Field(default=16, ge=1, le=1024)
    # Faces a model classifies at once. None: the runtime's own (LiteRT 12, whose activations then stay
    # in the CPU cache; Keras 256).
    predict_batch: int | None = Field(default=None, ge=1, le=65536)
    # Flip test-time augmentation when classifying: None does as the model's ferray.json says
    # (`inference.flip_tta`); False classifies each face once: half the classify cost for a little
    # accuracy; a temperature fitted with TTA then shifts confidences slightly.
    flip_tta: bool | None = None
    # Classifying runtime: `keras`, the artifact itself; `tflite`, its LiteRT graph at `lite_precision`,
    # exported once per model (keyed by model.keras's sha256; `python -m ferray.model.lite`) and run
    # without TensorFlow in the actors: half the CPU a face, seconds less start-up. float32 gives
    # Keras's probabilities to ~1e-5; float16 halves the file; int8 needs calibration faces (the
    # artifact's own `calibration.npz`, or an export beforehand) and is ~2.4x faster on CPUs with VNNI.
    # `auto`: the precision the model's ferray.json names (`inference.lite_precision`, checked against
    # Keras on val when the model was made), else float32 (figures: docs/benchmarks-annotate.md).
    # `cascade` (an ensemble that names one, `ferray.model.cascade`): the members' graphs pass by pass,
    # each face leaving at the first pass sure of it, the rest through every member in float32 (the
    # shipped default: 2.4 against 5.8 ms a face); without the model's calibration.npz `auto` runs float32.
    runtime: Literal["keras", "tflite"] = "tflite"
    lite_precision: Literal["auto", "float32", "float16", "int8", "cascade"] = "auto"
    # Per actor. `pools`: `fused` detects and classifies in one actor per CPU (the model loaded on
    # every CPU); `split` detects on CPU actors and classifies on their own actors: with num_gpus > 0
    # one per GPU share, else one per `label_every` CPUs holding no CPU of its own (classifying is a
    # fraction of detecting; Ray may place it on a head started with num-cpus 0), so TensorFlow starts
    # once, not on every CPU. `auto`: `split` with num_gpus > 0 or runtime `keras`, else `fused`
    # (LiteRT graphs load in ~2 CPU-s, and rows never travel between actors: 4% less CPU an image).
    label_every: int = Field(default=8, ge=1, le=1024)
    pools: Literal["auto", "fused", "split"] = "auto"
    # Remote and archived videos reach OpenCV as a seekable stream (reads only what a segment needs)
    # or as a local temp copy written in chunks (for OpenCV builds without stream input).
    video_io: Literal["stream", "copy"] = "stream"
    copy_chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    temp_dir: str | None = None
    # Driver threads probing new videos' frame count and rate (I/O bound on object storage).
    probe_threads: int = Field(default=8, ge=1, le=256)
    # Once every input is annotated by the current model and settings, remove shards of earlier ones.
    supersede: bool = True
    # Face tracks (ferray.annotate.tracks), linked once all of a video's segments are done; changing these redoes
    # only that pass, never detection or classification. A face links to the track whose predicted
    # box is nearest: its centre at most `track_max_shift` face widths away, its width within 2x.
    # A track not seen for `track_gap_seconds` ends (a person who comes back later gets a new track);
    # shorter gaps (a missed detection, a turned head) keep the track. `smooth_seconds`: the centred
    # window of a track's smoothed probabilities and label (0 = off; raw columns are never changed).
    # Smoothing steadies the labels; it does not correct the model (figures: docs/settings.md).
    track_gap_seconds: float = Field(default=2.0, gt=0, le=3600)
    track_max_shift: float = Field(default=1.0, gt=0, le=100)
    smooth_seconds: float = Field(default=2.0, ge=0, le=3600)
    overlays: bool = Field(default=False, description=(
        "Write pictures of what was found under OUT/_overlays/: each image with its boxes, labels and "
        "confidences (<image>.jpg, same size), each video as a contact sheet of up to 16 sampled frames "
        "(<video>.png), and faces.png, a sheet of the run's faces. Drawn after the rows are written, for "
        "inputs annotated afresh or without an overlay yet; never changes a row or the run key."))


class HeadSettings(Section):
    """The two-layer head (owned by ferray.model.head): Dense(hidden, relu) -> Dropout -> Dense(7, softmax)."""

    # The narrowest width that reaches the reference accuracy in the paper's 100 epochs (sweep:
    # docs/settings.md).
    hidden: int = Field(default=1024, ge=1, le=16384)
    # Guards the wide default (figures: docs/settings.md).
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)


class TrainSettings(Section):
    """Head training (owned by ferray.training.train): the paper's recipe by default, and the Ray Train run."""

    # The paper: SGD, momentum 0.9, lr 0.001, ×0.9 every 10 epochs.
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = Field(default=0.001, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    decay_rate: float = Field(default=0.9, gt=0.0, le=1.0)
    decay_every: int = Field(default=10, ge=1)
    epochs: int = Field(default=100, ge=1, le=100_000)
    # Global batch, split evenly over the workers (the paper gives none): smaller batches take more
    # steps at the paper's small rate, and every step of a multi-worker run is an allreduce
    # (figures: docs/settings.md).
    batch_size: int = Field(default=128, ge=1, le=1_048_576)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_weight: Literal["none", "balanced"] = "none"
    # Stop after this many epochs without a better val accuracy; 0 = run every epoch.
    patience: int = Field(default=0, ge=0)
    seed: int = 0
    workers: int = Field(default=1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    # Training steps per graph call: fewer Python round trips per epoch, same maths.
    steps_per_execution: int = Field(default=16, ge=1, le=10_000)
    # How often Ray Train's controller collects reports; an epoch never waits longer for its report.
    report_interval_s: float = Field(default=0.2, gt=0.0, le=60.0)
    # Worker-group restarts (a dead worker, a lost node) before the run fails; each resumes from
    # the last checkpoint. -1 = unlimited.
    max_failures: int = Field(default=3, ge=-1)
    # Where Ray Train keeps checkpoints (local path or s3://); None = MODEL_OUT/_checkpoints.
    # A multi-node cluster needs storage every node reaches (s3://, NFS).
    checkpoints: str | None = None
    # Ray Train run name; None = derived from the input and the recipe, so rerunning the same job
    # resumes it and a different job starts afresh.
    run_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> TrainSettings:
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers {self.workers}")
        return self

    def recipe(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where or on how many workers it runs)."""
        placement = {"workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoints", "run_name",
                     "report_interval_s", "steps_per_execution"}
        return self.model_dump(mode="json", exclude=placement)


class FineTuneSettings(Section):
    """Adapting the backbone to faces end to end (owned by ferray.training.tune; `ferray train --fine-tune K`).

    Off by default: the paper's path freezes the backbone. When on, `ferray train` reads ALIGNED
    faces (not embeddings), trains backbone + head on one Ray Train worker (a GPU when `--gpu`), and
    writes an ordinary ferray model whose backbone later frozen heads can reuse
    (`backbone.weights: artifact:MODEL_DIR`). Placement, checkpoints, run name and max_failures
    come from `train`.
    """

    # None = off; K = unfreeze the top K of the 16 MBConv blocks (+ the final conv); "all" = every layer.
    unfreeze: int | Literal["all"] | None = None
    # The side the backbone sees; faces are resized inside the model. ImageNet features need more
    # than 48 px (a 48 px face leaves the last stage a 2x2 map); 64 is what a 2-CPU run affords.
    input_size: int = Field(default=64, ge=32, le=1024)
    epochs: int = Field(default=16, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    # AdamW with linear warm-up then cosine decay to zero over `epochs`.
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    warmup_epochs: int = Field(default=1, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    # "balanced" weights the loss by inverse class frequency (FER-2013's disgust is 1.5% of train),
    # "sqrt" by its square root: most of the minority's recall for less of the majority's.
    class_weight: Literal["none", "balanced", "sqrt"] = "none"
    hidden: int = Field(default=256, ge=1, le=16384)
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    # Train-time augmentation, applied to raw faces on the fly.
    flip: bool = True
    shift: float = Field(default=0.1, ge=0.0, le=0.5)
    rotation_deg: float = Field(default=10.0, ge=0.0, le=180.0)
    zoom: float = Field(default=0.1, ge=0.0, le=0.5)
    erasing: float = Field(default=0.25, ge=0.0, le=1.0)
    # MixUp / CutMix: the Beta(alpha, alpha) of the mixing share, 0 = off; `mix_prob` of the batches
    # are mixed (by one of the two at even odds when both are on), the labels in the same proportion.
    mixup: float = Field(default=0.0, ge=0.0, le=10.0)
    cutmix: float = Field(default=0.0, ge=0.0, le=10.0)
    mix_prob: float = Field(default=1.0, ge=0.0, le=1.0)
    # Momentum of an exponential moving average of the weights, used for validation and kept as the
    # result (0 = off; 0.999 averages over about the last thousand steps).
    ema: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Knowledge distillation: each training target becomes (1 - distill) x its one-hot label + distill x
    # the mean probabilities (each with its own TTA and temperature) that these ferray models (`default`,
    # folders, registries, s3:// URIs, `MODEL#member_N`) give its un-augmented face, computed once before training.
    teachers: list[str] = Field(default_factory=list)
    distill: float = Field(default=0.0, ge=0.0, le=1.0)
    # Stop after this many epochs without a better val accuracy; 0 = run every epoch.
    patience: int = Field(default=0, ge=0)
    # Stop after the epoch that would cross this wall-clock budget (the schedule is not rescaled).
    time_budget_s: float | None = Field(default=None, gt=0)
    # Recorded in the artifact and applied by evaluate/annotate: average with the mirrored face, and
    # a temperature fitted on val (NLL) so confidences mean what they say.
    flip_tta: bool = True
    calibrate: bool = True
    seed: int = 0

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _unfreeze_from_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
            return None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FineTuneSettings:
        if isinstance(self.unfreeze, int) and not 0 <= self.unfreeze <= 16:
            raise ValueError(f"unfreeze {self.unfreeze}: EfficientNet has 16 blocks (0..16, or 'all')")
        if bool(self.teachers) != (self.distill > 0):
            raise ValueError("distillation needs both finetune.teachers and finetune.distill > 0")
        return self

    @property
    def enabled(self) -> bool:
        return self.unfreeze is not None


class EnsembleSettings(Section):
    """`ferray ensemble ALIGNED MODEL_OUT` (owned by ferray.model.ensemble): several models as one artifact
    whose probabilities are the mean of theirs."""

    # ferray models (`default`, folders, registries, s3:// URIs; `MODEL#member_N` for one member of an
    # ensemble) of the same face size and colour.
    members: list[str] = Field(default_factory=list)
    # Average each member's probabilities with the mirrored face's; `auto` keeps it if it scores higher on val.
    flip_tta: bool | Literal["auto"] = True
    # A temperature fitted on val (NLL) for the mean, so confidences mean what they say.
    calibrate: bool = True
    # macro_f1: per-class shifts of the mean's log-probabilities fitted on val to maximise macro-F1
    # (`inference.class_offsets`), for the classes class-imbalanced training under-predicts. Needs a val
    # set of thousands: on a few hundred faces the shifts follow noise.
    class_offsets: Literal["none", "macro_f1"] = "none"
    # How model.keras stores its kernels: float16 halves the file, widened to float32 at load.
    weights: Literal["float32", "float16"] = "float16"
    # The LiteRT graph annotate runs by default (`inference.lite_precision`). int8: calibrated on train
    # faces stored beside the model (calibration.npz), kept only if its val accuracy is within
    # `lite_max_drop` of the Keras model's; else float32. cascade: every order of the members' int8 and
    # float32 graphs tried as passes (`ferray.model.cascade`), each graph timed here; the order with the
    # least CPU a face whose val accuracy stays within `lite_max_drop` of the whole model's kept.
    lite_precision: Literal["float32", "int8", "cascade"] = "float32"
    lite_max_drop: float = Field(default=0.003, ge=0.0, le=1.0)
    # Train faces (drawn at random, seed 0) that calibrate the int8 graph's activation ranges: with 500 an
    # ensemble lost 0.53 points on val, with 2,000 0.36 or less; more costs only export time.
    calibration_faces: int = Field(default=2000, ge=1)


class DataSource(Section):
    """One dataset of an experiment: its layout (`ferray ingest` DATASET) and where it lives."""

    dataset: Literal["fer2013", "fer2013-csv", "rafdb", "ckplus", "jaffe", "folder"]
    source: str = Field(min_length=1)
    # Folder name under the workdir; defaults to the dataset name.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @property
    def label(self) -> str:
        return self.name or self.dataset


class PipelineSettings(Section):
    """`ferray pipeline`: ingest → align → embed → train → evaluate, every stage cached in `workdir`."""

    workdir: str = "ferray-runs/experiment"
    train: DataSource | None = None
    # Cross-dataset targets; the training dataset's own test split is always evaluated.
    evaluate: list[DataSource] = Field(default_factory=list)
    # Backbone sweep (the paper's model selection); empty = `backbone.name` alone.
    backbones: list[str] = Field(default_factory=list)


class RetrainSettings(Section):
    """`ferray pipeline --retrain` (owned by ferray.retrain): the registry and the promotion gate."""

    # Registry folder or `s3://` prefix (conventionally `…/models`); None = `<pipeline.workdir>/registry`.
    registry: str | None = Field(default=None, min_length=1)
    # Promote when candidate >= current - tolerance on `metric`, both scored on the same holdout rows.
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    tolerance: float = Field(default=0.0, ge=0.0, le=1.0)
    # The fixed holdout: None = the training dataset itself (its `holdout_split`); or another dataset,
    # prepared and embedded like an evaluate target. It must not change between runs, or the gate
    # compares numbers on different faces (the decision records the holdout's fingerprint).
    holdout: DataSource | None = None
    holdout_split: Literal["val", "test", "all"] = "test"

    @model_validator(mode="after")
    def _holdout_not_training_rows(self) -> RetrainSettings:
        # `all` of the training dataset includes the rows the candidate was fitted on.
        if self.holdout is None and self.holdout_split == "all":
            raise ValueError("holdout_split 'all' of the training dataset would score the candidate on its own "
                             "training rows; name a separate retrain.holdout or use val/test")
        return self


class Settings(BaseSettings):
    """The whole validated, frozen settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="FERRAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    storage: StorageSettings = StorageSettings()
    ray: RaySettings = RaySettings()
    ingest: IngestSettings = IngestSettings()
    faces: FacesSettings = FacesSettings()
    backbone: BackboneSettings = BackboneSettings()
    head: HeadSettings = HeadSettings()
    train: TrainSettings = TrainSettings()
    finetune: FineTuneSettings = FineTuneSettings()
    pipeline: PipelineSettings = PipelineSettings()
    retrain: RetrainSettings = RetrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    annotate: AnnotateSettings = AnnotateSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    # The YAML file the tree was read from, as its user named it (an artifact records which experiment made it).
    _config_file: str | None = PrivateAttr(default=None)

    @property
    def config_file(self) -> str | None:
        """The experiment file: relative to the working folder when inside it, else its name alone."""
        return self._config_file

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command-line overrides (init) beat the environment, which beats the YAML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _YAML_FILE.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data with every secret masked, for writing beside outputs."""
        return self.model_dump(mode="json")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if "secret" in where or "key" in where or "token" in where:
        shown = ""
    more = len(error.errors()) - 1
    tail = f"; and {more} more" if more else ""
    return f"{where}: {first['msg']}{shown}{tail}"


def _unknown_environment() -> str | None:
    """A `FERRAY_…` variable that names no settings section: a typo that would otherwise change nothing.

    Unknown fields of a known section are refused by the section itself (`extra="forbid"`).
    """
    for name in os.environ:
        if name.upper().startswith("FERRAY_"):
            section = name[len("FERRAY_") :].split("__", 1)[0].lower()
            if section not in Settings.model_fields:
                return name
    return None


def _experiment_name(path: Path) -> str:
    """A config path as an artifact may record it: never a machine path."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree once, on the driver; raise ConfigError with one clear line."""
    unknown = _unknown_environment()
    if unknown:
        raise ConfigError(f"unknown setting {unknown}: no section {unknown[7:].split('__')[0].lower()!r} "
                          f"(FERRAY_<SECTION>__<FIELD>, sections: {', '.join(Settings.model_fields)})")
    path: Path | None = None
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    token = _YAML_FILE.set(path)
    try:
        settings = Settings(**overrides)
        # Credentials and endpoint fall back to the AWS_* environment here, once, on the driver: every
        # stage and worker then uses `settings.storage` as it is and never reads the environment.
        settings = settings.model_copy(update={"storage": settings.storage.resolved()})
        settings._config_file = None if path is None else _experiment_name(path)
        return settings
    except ValidationError as error:
        raise ConfigError(f"invalid setting {_describe(error)}") from None
    except (OSError, ValueError, yaml.YAMLError) as error:  # unreadable or malformed YAML
        raise ConfigError(f"cannot read config {path}: {' '.join(str(error).split())}") from None
    finally:
        _YAML_FILE.reset(token)
