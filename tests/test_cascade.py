"""The confidence cascade's fit, search and run (`ferray.model.cascade`) on seeded problems."""

from __future__ import annotations

import numpy as np
import pytest

from ferray.model import cascade
from ferray.model.cascade import Cascade, Pass

INFERENCE = {"temperature": 1.2, "class_offsets": [0.0, -0.2, 0.0, 0.0, 0.0, 0.1, 0.0], "flip_tta": False}


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def problem(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A first pass that is right mostly where it is sure, a later one right more often, labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    def model(skill: float) -> np.ndarray:
        logits = rng.normal(0, 1, (n, 7))
        logits[np.arange(n), labels] += rng.uniform(0, skill, n)
        return softmax(logits)
    return model(3.0), model(4.5), labels


def members(seed: int, n: int = 600, count: int = 3) -> tuple[dict[tuple[int, str], np.ndarray], np.ndarray]:
    """`count` members' float32 outputs (each its own skill) and int8 ones (the same logits, jittered)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    raw: dict[tuple[int, str], np.ndarray] = {}
    for k in range(count):
        logits = rng.normal(0, 1, (n, 7))
        logits[np.arange(n), labels] += rng.uniform(0, 3.0 + k, n)
        raw[(k, "float32")] = softmax(logits)
        raw[(k, "int8")] = softmax(logits + rng.normal(0, 0.3, logits.shape))
    return raw, labels


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


@pytest.mark.parametrize("seed", range(8))
def test_the_fit_sends_on_the_fewest_faces_that_keep_the_target(seed: int) -> None:
    first, later, labels = problem(seed)
    target = accuracy(later, labels) - 0.01
    fitted = cascade.fit(first, later, labels, target)
    assert fitted.margin is not None
    sent = cascade.margins(first) < fitted.margin
    got = np.where(sent[:, None], later, first)
    assert accuracy(got, labels) == pytest.approx(fitted.accuracy) and fitted.accuracy >= target - 1e-9
    assert sent.mean() == pytest.approx(fitted.escalated) and 0 < sent.sum() < len(labels)
    # One face fewer sent on (the kept one with the smallest margin sent back) breaks the bound.
    order = np.argsort(cascade.margins(first))
    fewer = cascade.margins(first) < float(cascade.margins(first)[order[sent.sum() - 1]])
    assert accuracy(np.where(fewer[:, None], later, first), labels) < target
    # The margin sits between two faces' margins, not on one: another runtime's rounding keeps the split.
    assert np.abs(cascade.margins(first) - fitted.margin).min() > 0


def test_the_fit_at_its_limits() -> None:
    first, later, labels = problem(0)
    assert cascade.fit(first, later, labels, accuracy(later, labels)).accuracy >= accuracy(later, labels) - 1e-12
    assert cascade.fit(first, later, labels, 0.0).escalated == 0.0  # any loss allowed: nothing sent on
    perfect = np.eye(7, dtype=np.float32)[labels]
    worst = np.eye(7, dtype=np.float32)[(labels + 1) % 7] * 0.6 + 0.4 / 7
    never = cascade.fit(worst, perfect, labels, 1.0)  # the first pass is never right: it decides no face
    assert never.escalated == 1.0 and never.margin is None


def test_run_gives_each_face_the_estimate_of_the_first_pass_sure_of_it_and_reuses_float_work() -> None:
    raw, labels = members(1, n=300)
    n = len(labels)
    chain = Cascade((Pass(0, "int8", 0.5), Pass(2, "float32", 0.3), Pass(1, "int8", None)))
    asked: list[tuple[int, str, np.ndarray]] = []
    def compute(k: int, precision: str, rows: np.ndarray) -> np.ndarray:
        asked.append((k, precision, rows.copy()))
        return raw[(k, precision)][rows]
    got, reached = cascade.run(chain, n, 3, compute, INFERENCE)
    first = cascade.prefix_estimates([(0, "int8")], raw, INFERENCE)[0]
    second = cascade.prefix_estimates([(0, "int8"), (2, "float32")], raw, INFERENCE)[1]
    whole = cascade.whole_model(raw, 3, INFERENCE)
    leave_1 = cascade.margins(first) >= 0.5
    leave_2 = ~leave_1 & (cascade.margins(second) >= 0.3)
    rest = ~leave_1 & ~leave_2
    assert 0 < leave_1.sum() and 0 < leave_2.sum() and 0 < rest.sum()
    np.testing.assert_allclose(got[leave_1], first[leave_1], atol=1e-6)
    np.testing.assert_allclose(got[leave_2], second[leave_2], atol=1e-6)
    np.testing.assert_allclose(got[rest], whole[rest], atol=1e-6)
    assert reached == pytest.approx([1.0, 1 - leave_1.mean(), rest.mean(), rest.mean()])
    # Each graph ran once, on the faces still unsure; member 2's float32 output was not computed again.
    assert [(k, p) for k, p, _ in asked] == [(0, "int8"), (2, "float32"), (1, "int8"), (0, "float32"), (1, "float32")]
    assert len(asked[0][2]) == n and np.array_equal(asked[1][2], np.flatnonzero(~leave_1))
    assert all(np.array_equal(rows, np.flatnonzero(rest)) for _, _, rows in asked[2:])


@pytest.mark.parametrize("seed", range(4))
def test_fitted_passes_keep_val_within_the_drop_and_the_search_takes_the_cheapest(seed: int) -> None:
    raw, labels = members(seed)
    max_drop = 0.005
    whole = accuracy(cascade.whole_model(raw, 3, INFERENCE), labels)
    chain = cascade.fit_passes([(1, "int8"), (0, "int8"), (2, "float32")], raw, labels, 3, INFERENCE, max_drop)
    got, reached = cascade.run(chain, len(labels), 3, lambda k, p, rows: raw[(k, p)][rows], INFERENCE)
    assert accuracy(got, labels) >= whole - max_drop - 1e-9
    assert reached[-1] < 1.0  # some faces left before the whole model
    cost = {(k, p): (1.0 if p == "int8" else 2.5) * (1 + k / 4) for k, p in raw}
    best = cascade.search(raw, labels, 3, INFERENCE, cost, max_drop)
    assert best.accuracy >= whole - max_drop - 1e-9
    assert best.ms <= cascade.expected_ms(chain, reached, 3, cost) + 1e-9
    assert best.ms < sum(cost[(k, "float32")] for k in range(3))


def test_a_cascade_reads_and_writes_ferray_json() -> None:
    chain = Cascade((Pass(0, "int8", 0.575), Pass(2, "float32", None)))
    assert Cascade.from_meta({"inference": {"cascade": chain.to_dict()}}) == chain
    assert chain.to_dict()["passes"][1]["margin"] is None  # JSON null, never Infinity
    assert chain.graphs(3) == [(0, "int8"), (2, "float32"), (0, "float32"), (1, "float32")]
    # The first cascades: one int8 member, then the whole model.
    assert Cascade.from_meta({"inference": {"cascade": {"member": 1, "precision": "int8", "margin": 0.4}}}) == \
        Cascade((Pass(1, "int8", 0.4),))
    assert Cascade.from_meta({"inference": {}}) is None
