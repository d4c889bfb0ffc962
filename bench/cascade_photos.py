"""The default's confidence cascade on faces as annotate finds them in photos, and margins fitted on such faces.

Usage:
  .venv/bin/python bench/cascade_photos.py [--work DIR] [--test-photos 3000] [--max-drops 0.001 0.002]

Builds (once, in WORK) a photo of every FER-2013 PublicTest face as bench/annotate_photos.py builds its
archive (its `photo`), then takes the largest face of each photo as annotate does (decode, the default
detector, landmarks, chip) from it and from the first `--test-photos` photos of WORK's photos-10.zip
(PrivateTest faces; bench/annotate_photos.py --build-only --work WORK). On those faces: every member's int8
and float32 graph once, then the shipped cascade, and cascades fitted (`cascade.search`) on the photo
PublicTest faces alone and together with the aligned PublicTest faces, each scored on the photo PrivateTest
faces and on the aligned FER-2013 faces (--aligned). CPU a face is the cascade's expectation from the graph
times in the model's ferray.json (metrics.lite.graph_ms), as `cascade.search` weighs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import annotate as bench  # bench/annotate.py, beside this script
import numpy as np
from annotate_photos import build_photos, config_settings

log = logging.getLogger("bench.cascade_photos")
Raw = dict[tuple[int, str], np.ndarray]


def largest_faces(archive: Path, truth: dict[str, str], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotate's chip of the largest face found in each of the first `limit` photos, and its label index."""
    from ferray.annotate.detect import FaceFinder
    from ferray.annotate.job import (
        Job,
        face_settings,
        resolve_model,
        run_key,
        with_lite,
    )
    from ferray.data.images import decode
    from ferray.data.schema import LABELS
    from ferray.faces.align import align_face
    from ferray.faces.detect import detect_faces
    from ferray.faces.landmarks import predict_landmarks

    settings = config_settings("blazeface_cascade:tflite")
    storage = settings.storage.resolved()
    ref = with_lite(resolve_model("default", storage), settings.annotate, storage)
    faces = face_settings(settings.faces, ref)
    finder = FaceFinder(Job(str(archive), "", storage, faces, settings.annotate, ref, run_key(ref, faces, settings.annotate)))
    first, cap = finder.first, settings.annotate.detect_max_side
    reach = finder.detector.reach(first.upsample)
    chips, labels = [], []
    with zipfile.ZipFile(archive) as source:
        for name in sorted(truth)[:limit]:
            image = decode(source.read(name), faces.limits, faces.color)
            rects = [r for r in detect_faces(image, finder.detector, first.upsample, cap, reach, first.min_face_px)
                     if min(r.width(), r.height()) >= first.min_face_px]
            if rects:
                shape = predict_landmarks(image, rects[0], finder.predictor)
                chips.append(align_face(image, shape, faces.size, faces.padding, faces.chip_scale))
                labels.append(LABELS.index(truth[name]))
    return np.stack(chips)[..., None].astype(np.float32), np.array(labels)


def member_outputs(faces: np.ndarray, meta: dict[str, Any], storage: Any) -> Raw:
    """Every member's raw probabilities from its int8 and float32 graphs (no TTA), as the cascade runs them."""
    from ferray.model import artifact, cascade, lite

    members = len(meta["members"])
    every = cascade.Cascade(tuple(cascade.Pass(k, "int8", None) for k in range(members)))
    model = lite.CascadeModel.load(str(artifact.default_model_dir()), every, meta, storage)
    return {key: graph.member_raw(faces, False) for key, graph in model.graphs.items()}


def score(name: str, chosen: Any, raw: Raw, labels: np.ndarray, meta: dict[str, Any], cost: dict[tuple[int, str], float]) -> None:
    from ferray.model import cascade

    members, inference = len(meta["members"]), meta["inference"]
    probs, reached = cascade.run(chosen, len(labels), members, lambda k, p, rows: raw[(k, p)][rows], inference)
    whole = cascade.whole_model(raw, members, inference).argmax(1)
    print(f"  {name} ({len(labels)} faces): accuracy {100 * (probs.argmax(1) == labels).mean():.2f}% (whole model "
          f"{100 * (whole == labels).mean():.2f}%), labels as the whole model's {100 * (probs.argmax(1) == whole).mean():.2f}%, "
          f"{cascade.expected_ms(chosen, reached, members, cost):.2f} ms a face, reaching each pass "
          f"{' / '.join(f'{100 * r:.1f}' for r in reached)}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path.home() / "ferray-runs" / "bench-photos"))
    parser.add_argument("--aligned", default=str(Path.home() / "ferray-runs" / "data" / "fer2013-aligned"))
    parser.add_argument("--test-photos", type=int, default=3000)
    parser.add_argument("--max-drops", type=float, nargs="+", default=[0.001, 0.002])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ferray.config import load_settings
    from ferray.model import artifact, cascade
    from ferray.training import tune

    work = Path(args.work)
    storage = load_settings().storage.resolved()
    archive, known = work / "photos-val.zip", work / "photos-val.truth.json"
    if archive.exists() and known.exists():
        truth_val = json.loads(known.read_text())
    else:
        faces = bench.fer_faces("PublicTest_")
        truth_val = build_photos(archive, faces, len(faces), seed=1234, each_once=True)
        known.write_text(json.dumps(truth_val))
    truth_test = json.loads((work / "photos-10.truth.json").read_text())
    meta = json.loads((artifact.default_model_dir() / artifact.META_FILE).read_text())
    members = len(meta["members"])
    cost = {(int(key.split(":")[0].rsplit("_", 1)[1]), key.split(":")[1]): ms
            for key, ms in meta["metrics"]["lite"]["graph_ms"].items()}
    sets: dict[str, tuple[Raw, np.ndarray]] = {}
    for name, source, truth, limit in (("photo PublicTest", archive, truth_val, len(truth_val)),
                                       ("photo PrivateTest", work / "photos-10.zip", truth_test, args.test_photos)):
        faces, labels = largest_faces(source, truth, limit)
        sets[name] = member_outputs(faces, meta, storage), labels
    aligned, _, _ = tune.load_faces(args.aligned, storage, int(meta.get("face_size", 48)), 1)
    for split, name in (("val", "aligned PublicTest"), ("test", "aligned PrivateTest")):
        sets[name] = member_outputs(aligned[split].x.astype(np.float32), meta, storage), aligned[split].y
    shipped = cascade.Cascade.from_meta(meta)
    print(f"shipped: {shipped}")
    for name, (raw, labels) in sets.items():
        score(name, shipped, raw, labels, meta, cost)
    both = {key: np.concatenate([sets["aligned PublicTest"][0][key], sets["photo PublicTest"][0][key]])
            for key in sets["photo PublicTest"][0]}
    fits = {"photo PublicTest": sets["photo PublicTest"],
            "aligned + photo PublicTest": (both, np.concatenate([sets["aligned PublicTest"][1], sets["photo PublicTest"][1]]))}
    for drop in args.max_drops:
        for fitted_on, (raw, labels) in fits.items():
            choice = cascade.search(raw, labels, members, meta["inference"], cost, drop)
            print(f"fitted on {fitted_on}, max drop {drop}: {choice.cascade}")
            for name in ("photo PrivateTest", "aligned PrivateTest"):
                score(name, choice.cascade, *sets[name], meta, cost)


if __name__ == "__main__":
    main()
