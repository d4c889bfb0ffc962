"""`ferray annotate`: every face in every image and sampled video frame under SOURCE, labelled by MODEL."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import pickle
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ferray import io, media, tracks, video
from ferray.config import AnnotateSettings, FacesSettings, Settings, StorageSettings
from ferray.faces import TOO_SMALL, AlignResult, align_images, detector_reach, load_detector, load_predictor, too_small
from ferray.images import DecodeError, open_checked, to_array
from ferray.media import Ledger, MediaError, ShardRecord, Unit
from ferray.schema import ANNOTATION_SCHEMA, LABELS, MEDIA_IMAGE, MEDIA_VIDEO, STATUS_OK, TRACK_FIELDS, status
from ferray.shards import Summary, shard_stats

log = logging.getLogger(__name__)

NO_FACE = status("align", "no_face")
VIDEOS = "videos"
TIMELINES = "timelines"
# What detection hands to classification: the annotation columns known so far, plus the raw chip.
DRAFT_SCHEMA = pa.schema(
    [f for f in ANNOTATION_SCHEMA
     if f.name not in ("label", "label_name", "confidence", "probs", "model_version") and f not in TRACK_FIELDS]
    + [pa.field("chip", pa.binary())]
)


# --------------------------------------------------------------------------- the model, pinned for a run


@dataclass(frozen=True)
class ModelRef:
    """The artifact a run uses: resolved once on the driver (a registry's current version is pinned)."""

    uri: str  # folder, or `….keras` file, that ferray.model.load takes
    version: str
    face_size: int
    face_color: str
    flip_tta: bool = False  # the artifact's own `inference.flip_tta`


def resolve_model(model: str, storage: StorageSettings) -> ModelRef:
    """MODEL → the artifact and its `ferray.json`, without loading Keras on the driver."""
    from ferray import model as artifact
    from ferray.registry import RegistryError, resolve

    try:
        target = str(artifact.default_model_dir()) if model == artifact.DEFAULT else resolve(model, storage)
    except RegistryError as error:
        raise artifact.ModelError(str(error)) from None
    folder = target.rsplit("/", 1)[0] if target.endswith(".keras") else target
    model_uri = target if target.endswith(".keras") else io.join(folder, artifact.MODEL_FILE)
    meta_uri = io.join(folder, artifact.META_FILE)
    if not io.exists(model_uri, storage) or not io.exists(meta_uri, storage):
        raise artifact.ModelError(f"no model at {model}: need {artifact.MODEL_FILE} and {artifact.META_FILE}")
    meta = io.read_json(meta_uri, storage)
    artifact.check_labels(model, meta)  # here, on the driver: not as a failed actor once Ray has started
    version = artifact.Artifact(uri=folder, model=None, meta=meta).version
    return ModelRef(target, version, int(meta.get("face_size", 48)), str(meta.get("face_color", "gray")),
                    bool(meta.get("inference", {}).get("flip_tta", False)))


def face_settings(faces: FacesSettings, model: ModelRef) -> FacesSettings:
    """Faces as the model was trained on them; annotation keeps every face and never guesses one."""
    return faces.model_copy(update={"size": model.face_size, "color": model.face_color, "fallback": "none", "keep": "all"})


def run_key(model: ModelRef, faces: FacesSettings, settings: AnnotateSettings) -> str:
    """What output rows depend on: the model version and the settings that change rows or units."""
    knobs = {
        "model_version": model.version,
        "faces": faces.model_dump(mode="json"),
        "sampling": {k: getattr(settings, k) for k in ("fps", "every_nth", "segment_seconds", "max_faces")},
        "detect_max_side": settings.detect_max_side,
    }
    if settings.flip_tta not in (None, model.flip_tta):  # the model's own choice keeps earlier runs' key
        knobs["flip_tta"] = settings.flip_tta
    if settings.upsample == "auto" and faces.upsample > 0:  # runs before this setting keep their key
        knobs["detect"] = {"upsample": "auto", "upsample_below": settings.upsample_below}
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


# --------------------------------------------------------------------------- detection: units → draft rows


def row_id(path: str, frame: int | None, face: int | None) -> str:
    """Stable across reruns and SOURCE locations: the file's path inside SOURCE, frame and face."""
    text = f"{path}|{'-' if frame is None else frame}|{'-' if face is None else face}"
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


# A group of frames waiting for alignment holds at most this many pixels (16 1080p grey frames; one 12 MP photo).
GROUP_PIXELS = 33_000_000


@dataclass
class _Pending:
    """A decoded image or sampled frame waiting for its group's alignment, and the slot its rows go to."""

    image: np.ndarray
    where: dict[str, Any]  # the row's source columns, frame_index and timestamp_s included
    path: str
    slot: list[dict[str, Any]]


class FaceFinder:
    """Decodes images and sampled video frames and aligns every face; Dlib models loaded once."""

    def __init__(self, job: Job) -> None:
        fetch = functools.partial(io.fetch_cached, storage=job.storage)
        self.job, self.faces, self.settings = job, job.faces, job.settings
        self.detector = load_detector(job.faces, fetch)
        self.predictor = load_predictor(job.faces, fetch)
        self.tree = io.Tree(job.source, job.storage)
        # `auto`: a first pass without upsampling; faces.upsample only where it found nothing in a small
        # image, and not when faces.min_face_px is beyond the first pass's reach (it found every face that wide).
        auto = job.settings.upsample == "auto"
        self.first = job.faces.model_copy(update={"upsample": 0}) if auto else job.faces
        reach = detector_reach(self.first)
        retry = auto and job.faces.upsample > 0 and (reach is None or job.faces.min_face_px < reach)
        self.retry_below = job.settings.upsample_below if retry else None
        self._pending: list[_Pending] = []
        self._pending_pixels = 0

    def find(self, units: list[Unit]) -> tuple[pa.Table, dict[str, float]]:
        """Draft rows (with raw chips) of the units, in unit, frame and face order."""
        slots: list[list[dict[str, Any]]] = []
        counters: Counter[str] = Counter()
        for unit in units:
            slots += self.unit_rows(unit, counters)
        self._flush()
        rows = [row for slot in slots for row in slot]
        return pa.Table.from_pylist(rows, schema=DRAFT_SCHEMA), dict(counters)

    def unit_rows(self, unit: Unit, counters: Counter[str]) -> list[list[dict[str, Any]]]:
        """The unit's rows as slots in order: a frame's slot is filled when its group is aligned (_flush)."""
        base = {
            "unit": unit.name,
            "source_path": self.tree.member_uri(unit.member) if unit.member else io.join(self.tree.uri, unit.relpath),
            "media_type": unit.media,
        }
        if unit.status != STATUS_OK:
            return [[self._status_row(base, unit, unit.status, unit.error)]]
        try:
            if unit.media == MEDIA_IMAGE:
                return self._image_rows(unit, base)
            return self._video_rows(unit, base, counters)
        except (MediaError, DecodeError) as error:  # rows of frames already queued are dropped with their slots
            return [[self._status_row(base, unit, error.status, str(error))]]

    @staticmethod
    def _status_row(base: dict[str, Any], unit: Unit, row_status: str, error: str | None) -> dict[str, Any]:
        return {**base, "id": row_id(unit.name, None, None), "status": row_status, "error": error}

    def _image_rows(self, unit: Unit, base: dict[str, Any]) -> list[list[dict[str, Any]]]:
        if unit.size > self.faces.max_file_bytes:  # refused before its bytes are fetched
            raise DecodeError("too_large", f"{unit.size} bytes > limit {self.faces.max_file_bytes}")
        assert unit.member is not None
        try:
            data = self.tree.read(unit.member)
        except FileNotFoundError:
            raise MediaError("read", "missing", "listed but gone when read") from None
        except (OSError, EOFError, KeyError, ValueError) as error:  # unreadable object, corrupt archive member
            raise MediaError("read", "error", f"{type(error).__name__}: {error}"[:300]) from None
        image = to_array(open_checked(data, self.faces.max_file_bytes, self.faces.max_image_pixels), self.faces.color)
        return [self._frame_rows(image, base, unit.relpath, None, None)]

    def _video_rows(self, unit: Unit, base: dict[str, Any], counters: Counter[str]) -> list[list[dict[str, Any]]]:
        assert unit.member is not None
        rows: list[list[dict[str, Any]]] = []
        with video.capture(self.tree, unit.member, self.settings) as cap:
            probe = video.probe(cap)
            fps = probe.fps
            reader = video.SegmentReader(cap, unit.start, unit.end, media.sample_step(fps, self.settings))
            for frame_index, frame in reader:
                height, width = frame.shape[:2]
                if height * width > self.faces.max_image_pixels:
                    raise DecodeError("too_large", f"{width}x{height} frames > limit {self.faces.max_image_pixels} pixels")
                pixels = video.to_pixels(frame, self.faces.color)
                rows.append(self._frame_rows(pixels, base, unit.relpath, frame_index, frame_index / fps))
        counters["video_seconds"] += reader.seconds(fps)
        if reader.ended_early:
            rows.append([self._status_row(base, unit, status("video", "short_read"),
                                          f"decoding stopped after frame {reader.last_frame}, segment ends at {unit.end}")])
        elif unit.end is None and video.cut_short(reader.position, probe.frames):
            # The last segment reads to the file's end; a file cut mid-stream ends before its header says.
            rows.append([self._status_row(base, unit, status("video", "short_read"),
                                          f"decoding stopped at frame {reader.position} of the {probe.frames} "
                                          "the container declares (cut short?)")])
        elif not rows:  # every decoded frame has a slot, so none were decoded
            rows.append([self._status_row(base, unit, status("video", "no_frames"), f"no frame decoded from frame {unit.start}")])
        return rows

    def _frame_rows(self, image: np.ndarray, base: dict[str, Any], path: str, frame: int | None,
                    timestamp: float | None) -> list[dict[str, Any]]:
        """The slot of one image or frame: filled now when too small, else when its group is aligned."""
        where = {**base, "frame_index": frame, "timestamp_s": timestamp}
        small = too_small(image)
        if small:
            return [{**where, "id": row_id(path, frame, None), "status": TOO_SMALL, "error": small}]
        slot: list[dict[str, Any]] = []
        self._pending.append(_Pending(image, where, path, slot))
        self._pending_pixels += image.size
        if len(self._pending) >= self.settings.align_group or self._pending_pixels >= GROUP_PIXELS:
            self._flush()
        return slot

    def aligned_rows(self, image: np.ndarray, base: dict[str, Any], path: str, frame: int | None = None,
                     timestamp: float | None = None) -> list[dict[str, Any]]:
        """The draft rows of one decoded image or frame, aligned now (with any frames still pending)."""
        slot = self._frame_rows(image, base, path, frame, timestamp)
        self._flush()
        return slot

    def _flush(self) -> None:
        """Align the pending frames as one group (faces.align_images) and fill their slots."""
        pending, self._pending, self._pending_pixels = self._pending, [], 0
        if not pending:
            return
        cap, most = self.settings.detect_max_side, self.settings.max_faces
        results = align_images([p.image for p in pending], self.detector, self.predictor, self.first, most, cap)
        retry = [k for k, (p, result) in enumerate(zip(pending, results))
                 if not result.faces and self.retry_below is not None and min(p.image.shape[:2]) < self.retry_below]
        if retry:
            again = align_images([pending[k].image for k in retry], self.detector, self.predictor, self.faces, most, cap)
            for k, result in zip(retry, again):
                results[k] = result
        for p, result in zip(pending, results):
            p.slot.extend(self._face_rows(p, result))

    @staticmethod
    def _face_rows(p: _Pending, result: AlignResult) -> list[dict[str, Any]]:
        frame = p.where["frame_index"]
        if not result.faces:
            return [{**p.where, "id": row_id(p.path, frame, None), "faces_found": 0, "status": NO_FACE,
                     "error": "no face detected"}]
        return [
            {**p.where, "id": row_id(p.path, frame, k), "face_index": k, "faces_found": result.faces_found,
             "bbox": list(face.bbox), "status": STATUS_OK, "chip": np.ascontiguousarray(face.chip).tobytes()}
            for k, face in enumerate(result.faces)
        ]


# --------------------------------------------------------------------------- classification: drafts → rows


class Labeller:
    """The Keras artifact loaded once per actor (on its GPU when it has one), applied in batches."""

    def __init__(self, job: Job) -> None:
        from ferray import model as artifact
        from ferray.embed import configure_tensorflow

        configure_tensorflow(max(1, int(job.settings.num_cpus)), job.settings.num_gpus > 0)
        self.artifact = artifact.load(job.model.uri, job.storage)
        if self.artifact.version != job.model.version:
            raise artifact.ModelError(f"model at {job.model.uri} changed during the run "
                                      f"({job.model.version} planned, {self.artifact.version} found)")
        self.job = job
        self.channels = 1 if job.model.face_color == "gray" else 3

    def __call__(self, drafts: pa.Table) -> pa.Table:
        size, n = self.job.model.face_size, drafts.num_rows
        chips = drafts["chip"].to_pylist()
        rows = [i for i, chip in enumerate(chips) if chip is not None]
        labels: list[int | None] = [None] * n
        confidences: list[float | None] = [None] * n
        probs_column: list[list[float] | None] = [None] * n
        if rows:
            faces = np.stack([np.frombuffer(chips[i], np.uint8).reshape(size, size, self.channels) for i in rows])
            probs = self.artifact.predict(faces.astype(np.float32), self.job.settings.predict_batch, self.job.settings.flip_tta)
            for i, p in zip(rows, probs):
                labels[i] = int(p.argmax())
                confidences[i] = float(p.max())
                probs_column[i] = p.tolist()
        columns = {name: drafts[name] for name in DRAFT_SCHEMA.names if name != "chip"}
        columns["label"] = pa.array(labels, pa.int8())
        columns["label_name"] = pa.array([LABELS[k] if k is not None else None for k in labels], pa.string())
        columns["confidence"] = pa.array(confidences, pa.float32())
        columns["probs"] = pa.array(probs_column, ANNOTATION_SCHEMA.field("probs").type)
        columns["model_version"] = pa.array([self.job.model.version] * n, pa.string())
        columns.update({f.name: pa.nulls(n, f.type) for f in TRACK_FIELDS})  # filled once the video is done
        return pa.table({name: columns[name] for name in ANNOTATION_SCHEMA.names}, schema=ANNOTATION_SCHEMA)


# --------------------------------------------------------------------------- shard outputs and stats


def annotation_stats(shard: str, table: pa.Table, units: list[Unit] | tuple[media.UnitKey, ...], job_key: str,
                     version: str, counters: dict[str, float]) -> dict[str, Any]:
    """`_stats/<shard>.json`: counts by status and class, no-face rate, mean confidence, and its units."""
    statuses = table["status"].to_pylist()
    ok = pc.equal(table["status"], STATUS_OK)
    faces, no_face = statuses.count(STATUS_OK), statuses.count(NO_FACE)
    framed = {(u, f) for u, f, s in zip(table["unit"].to_pylist(), table["frame_index"].to_pylist(), statuses)
              if s in (STATUS_OK, NO_FACE)}
    confidence = float(pc.sum(table["confidence"].filter(ok)).as_py() or 0.0)
    keys = [unit.key if isinstance(unit, Unit) else tuple(unit) for unit in units]
    extra = {
        "units": len(keys),
        "frames": len(framed),
        "faces": faces,
        "no_face": no_face,
        "confidence_sum": confidence,
        "video_seconds": float(counters.get("video_seconds", 0.0)),
    }
    stats = shard_stats(shard, table, extra)
    mix = Counter(table["label_name"].filter(ok).to_pylist())
    stats.update({
        "run_key": job_key,
        "model_version": version,
        "no_face_rate": no_face / len(framed) if framed else None,
        "mean_confidence": confidence / faces if faces else None,
        "class_mix": {name: mix[name] / faces for name in LABELS} if faces else {},
        "units": [list(key) for key in keys],
    })
    return stats


def write_shard(job: Job, shard: str, fingerprint: str, table: pa.Table, units: list[Unit],
                counters: dict[str, float]) -> dict[str, Any]:
    stats = annotation_stats(shard, table, units, job.run_key, job.model.version, counters)
    io.ShardSink(job.out, job.storage).write(shard, table, fingerprint, stats)
    return stats


# --------------------------------------------------------------------------- Ray Data actors


class AnnotateWorker:
    """Fused actor (CPU): Dlib and the Keras model built once; a whole shard in, its stats out."""

    def __init__(self, job: Job) -> None:
        self.job, self.finder, self.labeller = job, FaceFinder(job), Labeller(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for shard, fingerprint, blob in zip(batch["shard"], batch["fingerprint"], batch["units"]):
            units = pickle.loads(blob)
            drafts, counters = self.finder.find(units)
            out.append(json.dumps(write_shard(self.job, str(shard), str(fingerprint), self.labeller(drafts), units, counters)))
        return {"stats": np.array(out, dtype=object)}


class DetectWorker:
    """Split mode, CPU actors: units → draft rows with chips, handed on as Arrow IPC."""

    def __init__(self, job: Job) -> None:
        self.finder = FaceFinder(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        drafts, counters = [], []
        for blob in batch["units"]:
            table, found = self.finder.find(pickle.loads(blob))
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            drafts.append(sink.getvalue().to_pybytes())
            counters.append(json.dumps(found))
        return {**batch, "drafts": np.array(drafts, dtype=object), "counters": np.array(counters, dtype=object)}


class LabelWorker:
    """Split mode, GPU (or CPU) actors: classify a shard's drafts and write it."""

    def __init__(self, job: Job) -> None:
        self.job, self.labeller = job, Labeller(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for shard, fingerprint, blob, drafts, counters in zip(
                batch["shard"], batch["fingerprint"], batch["units"], batch["drafts"], batch["counters"]):
            table = pa.ipc.open_stream(pa.py_buffer(drafts)).read_all()
            stats = write_shard(self.job, str(shard), str(fingerprint), self.labeller(table), pickle.loads(blob),
                                json.loads(counters))
            out.append(json.dumps(stats))
        return {"stats": np.array(out, dtype=object)}


def _pools(settings: AnnotateSettings) -> str:
    return "split" if settings.pools == "auto" else settings.pools


@dataclass(frozen=True)
class Actors:
    """How many actors of each kind a run starts (`fused`: `detect` actors that also classify)."""

    pools: str
    detect: int
    label: int
    label_cpus: float


def plan_actors(settings: AnnotateSettings, cpus: int, gpus: float) -> Actors:
    """Actor counts for the cluster: detection on every CPU; classification on GPUs, or on one actor
    per `label_every` CPUs that holds no CPU (a tenth of the work, TensorFlow loaded once)."""
    if settings.num_gpus and gpus < settings.num_gpus:
        raise ValueError(f"annotate.num_gpus={settings.num_gpus} but the cluster has {gpus:g} GPUs")
    pools = _pools(settings)
    if pools == "fused":
        size = max(1, int(cpus // settings.num_cpus))
        if settings.num_gpus:
            size = min(size, max(1, int(gpus // settings.num_gpus)))
        return Actors(pools, size, 0, settings.num_cpus)
    if settings.num_gpus:
        labellers = max(1, int(gpus // settings.num_gpus))
        return Actors(pools, max(1, int(cpus - labellers * settings.num_cpus)), labellers, settings.num_cpus)
    return Actors(pools, cpus, max(1, math.ceil(cpus / settings.label_every)), 0.0)


def execute(job: Job, units: list[Unit], listed: int, ray_settings: Any) -> Iterator[dict[str, Any]]:
    """Pack the units (of a SOURCE listing `listed` files) into shards and run them on one Ray Data
    graph; yields each shard's stats as it is written."""
    import ray

    from ferray.runtime import cluster_cpus, ensure_ray

    ensure_ray(ray_settings)
    settings = job.settings
    actors = plan_actors(settings, cluster_cpus(), float(ray.cluster_resources().get("GPU", 0)))
    shards = media.pack(units, media.for_actors(listed, settings, actors.detect))
    items = []
    for shard in shards:
        name, fingerprint = media.shard_identity(job.run_key, shard)
        items.append({"shard": name, "fingerprint": fingerprint, "units": pickle.dumps(shard)})
    detect, label = min(len(items), actors.detect), min(len(items), actors.label)
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    common = {"fn_constructor_kwargs": {"job": job}, "batch_size": 1}
    # Two shards queued per actor: the next is at hand when one ends, and no actor holds a backlog
    # while another has run dry.
    pool = functools.partial(ray.data.ActorPoolStrategy, max_tasks_in_flight_per_actor=2)
    if actors.pools == "fused":
        log.info("annotate: %d units in %d shards on %d fused actors", len(units), len(items), detect)
        dataset = dataset.map_batches(AnnotateWorker, compute=pool(size=detect),
                                      num_cpus=settings.num_cpus, num_gpus=settings.num_gpus or None, **common)
    else:
        log.info("annotate: %d units in %d shards on %d detect actors and %d classify actors",
                 len(units), len(items), detect, label)
        dataset = dataset.map_batches(DetectWorker, compute=pool(size=detect), num_cpus=1, **common)
        dataset = dataset.map_batches(LabelWorker, compute=pool(size=label), num_cpus=actors.label_cpus,
                                      num_gpus=settings.num_gpus or None, **common)
    for done, row in enumerate(dataset.iter_rows(), start=1):
        stats = json.loads(row["stats"])
        log.info("annotate: shard %s written (%d/%d): %d rows", stats["shard"], done, len(items), stats["rows"])
        yield stats


# --------------------------------------------------------------------------- planning on the driver


def probe_videos(tree: io.Tree, files: list[io.TreeFile], settings: AnnotateSettings) -> dict[str, media.Probe | MediaError]:
    """Frame count and rate of each new video; in threads for folders and prefixes (I/O bound)."""
    members = [f.member for f in files]
    if not members:
        return {}
    if tree.kind in ("zip", "tar"):  # one archive handle: not shareable across threads
        return {m: video.probe_member(tree, m, settings) for m in members}
    with ThreadPoolExecutor(max_workers=settings.probe_threads) as pool:
        return dict(zip(members, pool.map(lambda m: video.probe_member(tree, m, settings), members)))


def plan_units(tree: io.Tree, files: list[io.TreeFile], ledger: Ledger, settings: AnnotateSettings) -> list[Unit]:
    """Units of every file not fully annotated yet, minus segments already done, in path order."""
    todo = [f for f in files if not ledger.covers(f)]
    videos = [f for f in todo if f.relpath and media.media_type(f.relpath) == MEDIA_VIDEO and f.size > 0]
    probes = probe_videos(tree, videos, settings)
    units: list[Unit] = []
    for file in todo:
        if file.relpath and media.media_type(file.relpath) == MEDIA_VIDEO:
            units += media.video_units(file, probes.get(file.member), settings)
        else:
            units.append(media.file_unit(file))
    return sorted((u for u in units if not ledger.done(u)), key=lambda u: (u.relpath, u.segment))


def _unit_relpath(name: str, media_type: str | None) -> str:
    return name.rsplit("@", 1)[0] if media_type == MEDIA_VIDEO else name


def read_shard_rows(out: str, storage: StorageSettings, shard: str, columns: list[str] | None = None) -> pa.Table:
    """A finished shard's rows, ok and quarantined together."""
    sink = io.ShardSink(out, storage)
    tables = [io.read_parquet(sink.data_uri(shard), storage, columns)]
    if io.exists(sink.quarantine_uri(shard), storage):
        tables.append(io.read_parquet(sink.quarantine_uri(shard), storage, columns))
    return pa.concat_tables(tables)


def prune_replaced(job: Job, record: ShardRecord, sizes: dict[str, int]) -> None:
    """Drop the rows of files replaced in place (listed with another size) from a finished shard."""
    gone = {relpath for relpath, size, _, _ in record.units if sizes.get(relpath, size) != size}
    keep = tuple(key for key in record.units if key[0] not in gone)
    if not keep:
        media.remove_shard(job.out, job.storage, record.shard)
        return
    table = read_shard_rows(job.out, job.storage, record.shard)
    mask = [_unit_relpath(u, m) not in gone for u, m in zip(table["unit"].to_pylist(), table["media_type"].to_pylist())]
    table = table.filter(pa.array(mask, pa.bool_()))
    counters = {"video_seconds": record.stats.get("extra", {}).get("video_seconds", 0.0)}
    stats = annotation_stats(record.shard, table, keep, job.run_key, job.model.version, counters)
    fingerprint = hashlib.sha256(f"{job.run_key}\n{json.dumps(keep)}".encode()).hexdigest()
    io.ShardSink(job.out, job.storage).write(record.shard, table, fingerprint, stats)
    log.info("annotate: %s: dropped the rows of %d files replaced since", record.shard, len(gone))


# --------------------------------------------------------------------------- per-video summaries


def _video_key(relpath: str, units: list[tuple[str, int, int, int]], run: str, settings: AnnotateSettings) -> str:
    return hashlib.sha256(json.dumps([run, sorted(units), tracks.knobs(settings)], sort_keys=True).encode()).hexdigest()


def write_video_summaries(job: Job, files: list[io.TreeFile], records: list[ShardRecord], threads: int,
                          redo: frozenset[str] = frozenset()) -> int:
    """A summary row (`OUT/videos/<path>.parquet`) and timeline (`OUT/timelines/<path>.png`) per finished video,
    its tracks (`OUT/tracks/<path>.parquet`, and their columns in its shards); again for the videos in
    `redo` (a shard of theirs was written afresh, without track columns).

    A name too long to take the suffix is shortened (`media.output_path`).
    """
    where: dict[tuple[str, int], list[tuple[str, int, int, int]]] = defaultdict(list)
    shards_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        for key in record.units:
            relpath, size = key[0], key[1]
            if media.media_type(relpath) == MEDIA_VIDEO:
                where[(relpath, size)].append(key)
                shards_of[relpath].add(record.shard)
    ledger = Ledger(records, job.run_key)
    wanted = {}
    for file in files:
        if file.relpath and media.media_type(file.relpath) == MEDIA_VIDEO and ledger.covers(file):
            units = where[(file.relpath, file.size)]
            wanted[file.relpath] = (file, _video_key(file.relpath, units, job.run_key, job.settings))

    def stale(item: tuple[str, tuple[io.TreeFile, str]]) -> bool:
        marker = io.join(job.out, VIDEOS, io.MARKERS, media.output_path(item[0], ".json"))
        if item[0] in redo or not io.exists(marker, job.storage):
            return True
        return io.read_json(marker, job.storage).get("fingerprint") != item[1][1]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        todo = [item for item, again in zip(wanted.items(), pool.map(stale, wanted.items())) if again]
    if not todo:
        return 0
    columns = ["unit", "source_path", "media_type", *tracks.COLUMNS]
    needed = sorted({shard for relpath, _ in todo for shard in shards_of[relpath]})
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tables = list(pool.map(lambda s: read_shard_rows(job.out, job.storage, s, columns), needed))
    everything = pa.concat_tables(tables)
    rows = everything.filter(pc.equal(everything["media_type"], MEDIA_VIDEO))
    relpaths = np.array([_unit_relpath(u, MEDIA_VIDEO) for u in rows["unit"].to_pylist()], dtype=object)
    track_columns: list[pa.Table] = []
    for relpath, (file, fingerprint) in todo:
        mine = rows.filter(pa.array(relpaths == relpath, pa.bool_()))
        source_path = mine["source_path"][0].as_py() if mine.num_rows else relpath
        timeline = io.join(job.out, TIMELINES, media.output_path(relpath, ".png"))
        summary = video.summarize(source_path, job.model.version, mine, timeline)
        if summary["frames_sampled"]:
            io.write_bytes_atomic(timeline, video.timeline_png(relpath, mine), job.storage)
        # Face tracks over the whole video (ferray.tracks): their summaries and timeline now, their
        # columns into the shards below, before any marker says the video is done.
        found = tracks.video_tracks(source_path, job.model.version, mine, job.settings)
        summary.update(tracks.write_video(job.out, job.storage, relpath, found, summary["duration_s"]))
        track_columns.append(found.columns)
        io.write_parquet(video.summary_table(summary), io.join(job.out, VIDEOS, media.output_path(relpath, ".parquet")),
                         job.storage)
    tracks.fill_shards(job.out, job.storage, needed, pa.concat_tables(track_columns), threads)
    for relpath, (_, fingerprint) in todo:
        io.write_json(io.join(job.out, VIDEOS, io.MARKERS, media.output_path(relpath, ".json")),
                      {"fingerprint": fingerprint}, job.storage)
    return len(todo)


# --------------------------------------------------------------------------- the command


def run(settings: Settings, model: str, source: str, out: str) -> Summary:
    """Annotate SOURCE into OUT with MODEL; inputs already annotated by the same model and settings are skipped."""
    started = time.perf_counter()
    storage = settings.storage.resolved()
    io.check_reachable(source, storage, must_exist=True)
    io.check_reachable(out, storage, must_exist=False)
    ref = resolve_model(model, storage)
    faces = face_settings(settings.faces, ref)
    job = Job(source, out, storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate))
    threads = settings.annotate.probe_threads

    tree = io.Tree(source, storage)
    files = _inputs(tree, out, storage)
    changed = media.remove_unmarked(out, storage) > 0
    ledger = Ledger(media.read_ledger(out, storage, threads), job.run_key)
    replaced = ledger.stale({f.relpath: f.size for f in files if f.relpath is not None})
    for record in replaced:
        prune_replaced(job, record, {f.relpath: f.size for f in files if f.relpath is not None})
    if replaced:
        changed = True
        ledger = Ledger(media.read_ledger(out, storage, threads), job.run_key)
    units = plan_units(tree, files, ledger, settings.annotate)
    tree.close()

    summary = Summary(stage="annotate", source=source, out=out)
    for record in ledger.current:
        summary.add(record.stats)
    summary.shards_skipped = len(ledger.current)
    log.info("annotate: %d files, %d units to do, %d shards already done (model %s)",
             len(files), len(units), summary.shards_skipped, ref.version)
    written: list[ShardRecord] = []
    if units:
        for stats in execute(job, units, len(files), settings.ray):
            summary.add(stats)
            written.append(ShardRecord(stats["shard"], job.run_key, tuple(tuple(u) for u in stats["units"]), stats))  # type: ignore[misc]
        summary.shards_written = len(written)
    if settings.annotate.supersede and ledger.others:
        for record in ledger.others:
            media.remove_shard(out, storage, record.shard)
        summary.extra["shards_superseded"] = len(ledger.others)
        log.info("annotate: removed %d shards of earlier models or settings", len(ledger.others))
    fresh = frozenset(key[0] for record in written for key in record.units)
    videos = write_video_summaries(job, files, ledger.current + written, threads, fresh)
    summary.extra["video_summaries_written"] = videos
    _finish(summary, files)
    summary.seconds = round(time.perf_counter() - started, 2)
    if written or videos or changed or ledger.others:
        io.write_json(io.join(out, io.META, "annotate.json"),
                      {"model": model, "model_uri": ref.uri, "model_version": ref.version, "run_key": job.run_key,
                       "summary": summary.to_dict(), "settings": settings.public_dict()}, storage)
    return summary


def _inputs(tree: io.Tree, out: str, storage: StorageSettings) -> list[io.TreeFile]:
    """SOURCE's files, less OUT when OUT lies inside SOURCE (its timelines are not photos to label)."""
    files = tree.files()
    if tree.kind != "dir":
        return files
    out_fs, out_path = io.url_to_fs(out, storage)
    if type(out_fs) is not type(tree.fs) or not out_path.startswith(tree.path.rstrip("/") + "/"):
        return files
    inside = out_path[len(tree.path.rstrip("/")) + 1 :].rstrip("/") + "/"
    kept = [f for f in files if not f.member.startswith(inside)]
    if len(kept) < len(files):
        log.info("annotate: OUT is inside SOURCE; its %d files are not inputs", len(files) - len(kept))
    return kept


def _finish(summary: Summary, files: list[io.TreeFile]) -> None:
    """Run-level figures for the one-screen report: inputs by kind, no-face rate, mean confidence."""
    kinds = Counter(media.media_type(f.relpath or f.member) or "other" for f in files)
    summary.extra.update({f"inputs_{kind}": count for kind, count in kinds.items()})
    frames, faces = summary.extra.get("frames", 0), summary.extra.get("faces", 0)
    confidence = summary.extra.pop("confidence_sum", 0.0)
    summary.extra["no_face_rate"] = round(summary.extra.get("no_face", 0) / frames, 4) if frames else 0
    summary.extra["mean_confidence"] = round(confidence / faces, 4) if faces else 0
    summary.extra["video_seconds"] = round(summary.extra.get("video_seconds", 0.0), 2)
