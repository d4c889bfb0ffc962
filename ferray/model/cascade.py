"""A confidence cascade for annotate: an ensemble's members run one at a time, cheapest first, and a face
leaves as soon as the members seen so far are sure of it; only the close calls reach the whole model.

On FER-2013 an ensemble's members agree on most faces; where the mean of the members seen so far puts its
top two probabilities far apart, the whole ensemble almost always gives the same label. A cascade is a list
of passes, each one member's LiteRT graph at a precision (`int8` or `float32`). After each pass, a face's
estimate is the ensemble's recipe (class offsets, temperature) on the mean of the members seen so far (a
member's float32 output replaces its int8 one); faces whose top-1 minus top-2 margin is at least the pass's
margin take that estimate. Faces left after the last pass get every member in float32: the whole model,
so the work of the float passes is never done twice.

The margins are fitted on val from the last pass back, each sending on the fewest faces while the
cascade's val accuracy stays within `max_drop` of the whole model's; `search` tries every order of passes
and keeps the one with the least expected CPU a face (each graph timed on this machine). ferray.json
records it as `inference.cascade` ({passes: [{member, precision, margin}]}) and `inference.lite_precision:
cascade`; int8 graphs are calibrated on the artifact's own faces (`calibration.npz`), so any machine
exports the same graphs.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ferray.errors import InputError
from ferray.model import head

log = logging.getLogger(__name__)

PRECISION = "cascade"  # what `inference.lite_precision` / `annotate.lite_precision` call it
PASS_PRECISIONS = ("int8", "float32")
# Computes one member's raw probabilities (its own TTA applied) at a precision for the faces at `rows`.
Compute = Callable[[int, str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Pass:
    member: int  # which member's graph (`MODEL#member_N`)
    precision: str  # int8 or float32
    margin: float | None  # faces whose estimate's margin is at least this leave here; None: none leave

    def decides(self, margins_: np.ndarray) -> np.ndarray:
        return np.zeros(len(margins_), bool) if self.margin is None else margins_ >= self.margin


@dataclass(frozen=True)
class Cascade:
    passes: tuple[Pass, ...]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Cascade | None:
        found = meta.get("inference", {}).get("cascade")
        if not found:
            return None
        if "passes" not in found:  # one int8 member first, then the whole model (ferray 0.1's first cascades)
            found = {"passes": [{"member": found["member"], "precision": found.get("precision", "int8"),
                                 "margin": found["margin"]}]}
        return cls(tuple(Pass(int(p["member"]), str(p["precision"]), None if p["margin"] is None else float(p["margin"]))
                         for p in found["passes"]))

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [asdict(p) for p in self.passes]}

    def graphs(self, members: int) -> list[tuple[int, str]]:
        """Every (member, precision) graph it may run: its passes', and each member's float32 for the rest."""
        return list(dict.fromkeys([(p.member, p.precision) for p in self.passes] + [(k, "float32") for k in range(members)]))


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row."""
    if not len(probs):
        return np.zeros(0, np.float32)
    top = np.sort(probs, axis=1)
    return top[:, -1] - top[:, -2]


def estimate(outputs: Sequence[np.ndarray], inference: dict[str, Any]) -> np.ndarray:
    """The ensemble's recipe (class offsets, temperature) on the mean of members' raw outputs; its TTA is
    each member's own, applied before the mean."""
    steps = {k: v for k, v in inference.items() if k != "flip_tta"}
    return head.apply_recipe(np.mean(outputs, axis=0), steps).astype(np.float32)


def run(cascade: Cascade, n: int, members: int, compute: Compute, inference: dict[str, Any]
        ) -> tuple[np.ndarray, list[float]]:
    """The cascade's probabilities for n faces, and the share of faces each pass, then the whole model, ran on."""
    seen: dict[int, tuple[str, np.ndarray]] = {}  # member -> (its most precise graph so far, raw rows of all n)
    out: np.ndarray | None = None
    active = np.arange(n)
    reached: list[float] = []

    def run_graph(member: int, precision: str) -> None:
        known = seen.get(member)
        if known is not None and known[0] == "float32":  # an int8 output never replaces a float32 one
            return
        raw = np.asarray(compute(member, precision, active), np.float32)
        full = known[1] if known is not None else np.zeros((n, raw.shape[1]), np.float32)
        full[active] = raw
        seen[member] = (precision, full)

    def settle(leave: np.ndarray | None) -> None:
        """The estimate of the faces still unsure, given to those leaving (all of them when `leave` is None)."""
        nonlocal out, active
        probs = estimate([raw[active] for _, raw in seen.values()], inference)
        out = np.zeros((n, probs.shape[1]), np.float32) if out is None else out
        chosen = np.ones(len(active), bool) if leave is None else leave(probs)
        out[active[chosen]] = probs[chosen]
        active = active[~chosen]

    for step in cascade.passes:
        reached.append(len(active) / max(n, 1))
        if len(active):
            run_graph(step.member, step.precision)
            settle(lambda probs: step.decides(margins(probs)))
    reached.append(len(active) / max(n, 1))
    if len(active):
        for member in range(members):
            run_graph(member, "float32")
        settle(None)
    return out if out is not None else np.zeros((0, 0), np.float32), reached


def prefix_estimates(passes: Sequence[tuple[int, str]], raw: dict[tuple[int, str], np.ndarray],
                     inference: dict[str, Any]) -> list[np.ndarray]:
    """Every face's estimate after each pass (no face leaving), from each graph's raw probabilities."""
    best: dict[int, tuple[str, np.ndarray]] = {}
    estimates = []
    for member, precision in passes:
        if best.get(member, ("",))[0] != "float32":
            best[member] = (precision, raw[(member, precision)])
        estimates.append(estimate([r for _, r in best.values()], inference))
    return estimates


def whole_model(raw: dict[tuple[int, str], np.ndarray], members: int, inference: dict[str, Any]) -> np.ndarray:
    """The whole model's probabilities: its recipe on the mean of every member's float32 output."""
    return estimate([raw[(k, "float32")] for k in range(members)], inference)


@dataclass(frozen=True)
class Fit:
    margin: float | None  # None: no face may leave here
    escalated: float  # share of val faces sent on
    accuracy: float  # val accuracy with this pass's decisions


def fit(first: np.ndarray, later: np.ndarray, labels: np.ndarray, target: float) -> Fit:
    """The margin that sends the fewest faces on while accuracy stays at least `target`: faces under the
    margin take `later`'s probabilities, the rest `first`'s. Faces are sent on in order of rising margin;
    the threshold sits halfway between the last face sent and the first kept, so that another runtime's
    rounding does not move a face across."""
    each = margins(first)
    order = np.argsort(each, kind="stable")
    sorted_margins = each[order]
    right_first = (first.argmax(1) == labels)[order].astype(np.int64)
    right_later = (later.argmax(1) == labels)[order].astype(np.int64)
    n = len(labels)
    # accuracy when the k lowest-margin faces go on: `later`'s right answers among them, `first`'s among the rest
    right = np.concatenate([[0], np.cumsum(right_later)]) + np.concatenate([np.cumsum(right_first[::-1])[::-1], [0]])
    within = np.flatnonzero(right / max(n, 1) >= target - 1e-12)
    k = int(within[0]) if len(within) else n
    if k == 0:
        margin: float | None = 0.0
    elif k == n:
        margin = None
    else:
        margin = float((sorted_margins[k - 1] + sorted_margins[k]) / 2)
    return Fit(margin=margin, escalated=k / max(n, 1), accuracy=float(right[k] / max(n, 1)))


def fit_passes(passes: Sequence[tuple[int, str]], raw: dict[tuple[int, str], np.ndarray], labels: np.ndarray,
               members: int, inference: dict[str, Any], max_drop: float) -> Cascade:
    """Margins for passes in this order, fitted from the last pass back: each keeps accuracy within `max_drop`
    of the whole model's, given what the passes after it (then the whole model) do with the faces it sends on."""
    later = whole_model(raw, members, inference)
    target = float((later.argmax(1) == labels).mean()) - max_drop if len(labels) else 0.0
    fitted: list[Pass] = []
    for (member, precision), guess in reversed(list(zip(passes, prefix_estimates(passes, raw, inference)))):
        step = Pass(member, precision, fit(guess, later, labels, target).margin)
        later = np.where(step.decides(margins(guess))[:, None], guess, later)
        fitted.append(step)
    return Cascade(tuple(reversed(fitted)))


def orders(members: int) -> list[list[tuple[int, str]]]:
    """Every order of passes worth trying: some members in int8 (any order), then some in float32."""
    found = []
    for cheap in range(members + 1):
        for first in itertools.permutations(range(members), cheap):
            for exact in range(members):  # all members in float32 is what the whole model runs anyway
                for then in itertools.permutations(range(members), exact):
                    passes = [(k, "int8") for k in first] + [(k, "float32") for k in then]
                    if passes:
                        found.append(passes)
    return found


def expected_ms(cascade: Cascade, reached: Sequence[float], members: int, cost: dict[tuple[int, str], float]) -> float:
    """CPU ms a face: each pass's graph on the share of faces that reach it, the whole model's missing float32
    graphs on the share left after the last pass."""
    total = sum(share * cost[(p.member, p.precision)] for p, share in zip(cascade.passes, reached))
    done = {p.member for p in cascade.passes if p.precision == "float32"}
    return total + reached[-1] * sum(cost[(k, "float32")] for k in range(members) if k not in done)


@dataclass(frozen=True)
class Choice:
    cascade: Cascade
    ms: float  # expected CPU ms a face on val
    reached: list[float]  # share of val faces each pass, then the whole model, ran on
    accuracy: float


def search(raw: dict[tuple[int, str], np.ndarray], labels: np.ndarray, members: int, inference: dict[str, Any],
           cost: dict[tuple[int, str], float], max_drop: float) -> Choice:
    """The order of passes, with its fitted margins, whose expected CPU a face on val is least."""
    best: Choice | None = None
    for passes in orders(members):
        chosen = fit_passes(passes, raw, labels, members, inference, max_drop)
        probs, reached = run(chosen, len(labels), members, lambda k, p, rows: raw[(k, p)][rows], inference)
        candidate = Choice(chosen, expected_ms(chosen, reached, members, cost), reached,
                           float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0)
        if best is None or candidate.ms < best.ms - 1e-9:
            best = candidate
    assert best is not None
    return best


def cpu_ms(raw: Callable[[np.ndarray], np.ndarray], faces: np.ndarray, count: int = 512, repeats: int = 3) -> float:
    """CPU ms a face of a graph on this machine, what `search` weighs: the least of `repeats` passes over
    `count` faces after a warm-up batch, in this thread's CPU time (the graph runs on one thread; the
    process's other threads, TensorFlow's after a conversion, would otherwise count)."""
    sample = faces[:count]
    raw(sample[:64])
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        raw(sample)
        best = min(best, time.thread_time() - started)
    return 1000 * best / max(len(sample), 1)


def choose(model_out: str, meta: dict[str, Any], faces: dict[str, Any], storage: Any, max_drop: float,
           count: int) -> dict[str, Any]:
    """Fit the cheapest cascade of the ensemble at MODEL_OUT on val (its int8 graphs calibrated on `count`
    train faces stored beside the model) and say so in `meta` (`inference.cascade`,
    `inference.lite_precision`). `faces[split]` has `.x` (raw faces) and `.y`. Returns the report for
    `metrics.lite`."""
    from ferray.model import lite
    from ferray.model.ensemble import MEMBER_PREFIX

    members = len(meta.get("members") or [])
    if members < 2:
        raise InputError(f"a cascade needs an ensemble; {model_out} has {members} members")
    chosen = lite.store_calibration(model_out, faces["train"].x, count, storage)
    inference = meta.get("inference", {})
    flip = bool(inference.get("flip_tta"))
    raw: dict[str, dict[tuple[int, str], np.ndarray]] = {"val": {}, "test": {}}
    cost: dict[tuple[int, str], float] = {}
    for k in range(members):
        for precision in PASS_PRECISIONS:
            # Keyed by model.keras and the calibration faces just stored: a graph found is this one.
            graph = lite.LiteModel(lite.export(f"{model_out}#{MEMBER_PREFIX}{k}", storage, precision),  # type: ignore[arg-type]
                                   meta, storage, threads=1)
            for split in raw:
                raw[split][(k, precision)] = graph.member_raw(faces[split].x.astype(np.float32), flip)
            cost[(k, precision)] = cpu_ms(lambda x: graph.member_raw(x, flip), faces["val"].x.astype(np.float32))
            log.info("cascade: member %d %s: %.2f CPU ms a face", k, precision, cost[(k, precision)])
    best = search(raw["val"], faces["val"].y, members, inference, cost, max_drop)
    whole_ms = sum(cost[(k, "float32")] for k in range(members))
    report: dict[str, Any] = {"precision": PRECISION, **best.cascade.to_dict(), "calibration_faces": int(len(chosen)),
                              "graph_ms": {f"{MEMBER_PREFIX}{k}:{p}": round(v, 3) for (k, p), v in cost.items()},
                              "whole_ms": round(whole_ms, 3), "val_ms": round(best.ms, 3)}
    for split in ("val", "test"):
        y = faces[split].y
        whole = whole_model(raw[split], members, inference)
        got, reached = run(best.cascade, len(y), members, lambda k, p, rows: raw[split][(k, p)][rows], inference)
        report[f"{split}_reached"] = [round(r, 4) for r in reached]
        report[f"{split}_accuracy"] = float((got.argmax(1) == y).mean()) if len(y) else None
        report[f"{split}_whole_accuracy"] = float((whole.argmax(1) == y).mean()) if len(y) else None
        report[f"{split}_agreement"] = float((got.argmax(1) == whole.argmax(1)).mean()) if len(y) else None
    log.info("cascade: %s: %.2f against %.2f CPU ms a face on val, val %.4f (whole %.4f)", best.cascade.to_dict(),
             best.ms, whole_ms, report["val_accuracy"] or 0.0, report["val_whole_accuracy"] or 0.0)
    if best.ms >= whole_ms:  # nothing cheaper than the whole model within the allowed drop
        log.warning("cascade: none cheaper than the whole model within %.2f points of val: annotate keeps float32", 100 * max_drop)
        report["precision"] = "float32"
        meta["inference"].pop("cascade", None)
    else:
        meta["inference"]["cascade"] = best.cascade.to_dict()
    meta["inference"]["lite_precision"] = report["precision"]
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m ferray.model.cascade MODEL_DIR ALIGNED [--max-drop 0.001] [--calibration-faces N]`: fit a
    cascade for an existing ensemble on ALIGNED's val (its train faces calibrate), and write it into the
    model's ferray.json and calibration.npz (model.keras untouched)."""
    import argparse
    import json

    from ferray.config import load_settings
    from ferray.data import io
    from ferray.model import artifact
    from ferray.training import tune

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="an ensemble's folder (written in place)")
    parser.add_argument("aligned", help="aligned shards with train and val rows")
    parser.add_argument("--max-drop", type=float, help="val accuracy the cascade may lose (default: ensemble.lite_max_drop)")
    parser.add_argument("--calibration-faces", type=int, help="default: ensemble.calibration_faces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings()
    storage = settings.storage.resolved()
    meta = io.read_json(io.join(args.model, artifact.META_FILE), storage)
    side, channels = int(meta.get("face_size", 48)), 1 if meta.get("face_color", "gray") == "gray" else 3
    faces, _, _ = tune.load_faces(args.aligned, storage, side, channels)
    report = choose(args.model, meta, faces, storage, settings.ensemble.lite_max_drop if args.max_drop is None
                    else args.max_drop, args.calibration_faces or settings.ensemble.calibration_faces)
    meta.setdefault("metrics", {})["lite"] = report
    io.write_json(io.join(args.model, artifact.META_FILE), meta, storage)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
