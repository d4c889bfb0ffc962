"""The confidence cascade's fit and combination (`ferray.model.cascade`) on seeded problems."""

from __future__ import annotations

import numpy as np
import pytest

from ferray.model import cascade


def problem(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A first pass that is right mostly where it is sure, a whole model right more often, labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    def model(skill: float) -> np.ndarray:
        logits = rng.normal(0, 1, (n, 7))
        logits[np.arange(n), labels] += rng.uniform(0, skill, n)
        e = np.exp(logits)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)
    return model(3.0), model(4.5), labels


@pytest.mark.parametrize("seed", range(8))
def test_the_fit_sends_on_the_fewest_faces_that_keep_val_within_the_drop(seed: int) -> None:
    first, whole, labels = problem(seed)
    max_drop = 0.01
    fitted = cascade.fit(first, whole, labels, max_drop)
    whole_accuracy = float((whole.argmax(1) == labels).mean())
    assert fitted.whole_accuracy == pytest.approx(whole_accuracy)
    got = cascade.combine(first, np.arange(len(labels)), lambda idx: whole[idx], fitted.margin)
    accuracy = float((got.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(fitted.accuracy) and accuracy >= whole_accuracy - max_drop - 1e-9
    sent = cascade.margins(first) < fitted.margin
    assert sent.mean() == pytest.approx(fitted.escalated) and 0 < sent.sum() < len(labels)
    # One face fewer sent on (the kept one with the smallest margin sent back) breaks the bound.
    order = np.argsort(cascade.margins(first))
    fewer = cascade.combine(first, np.arange(len(labels)), lambda idx: whole[idx],
                            float(cascade.margins(first)[order[sent.sum() - 1]]))
    assert float((fewer.argmax(1) == labels).mean()) < whole_accuracy - max_drop
    # The margin sits between two faces' margins, not on one: another runtime's rounding keeps the split.
    m = cascade.margins(first)
    assert np.abs(m - fitted.margin).min() > 0


def test_the_fit_at_its_limits() -> None:
    first, whole, labels = problem(0)
    everything = cascade.fit(first, whole, labels, 0.0)
    assert everything.accuracy >= everything.whole_accuracy - 1e-12
    assert cascade.fit(first, whole, labels, 1.0).escalated == 0.0  # any loss allowed: nothing sent on
    perfect = np.eye(7)[labels]
    worst = np.eye(7)[(labels + 1) % 7] * 0.6 + 0.4 / 7
    assert cascade.fit(worst, perfect, labels, 0.0).escalated == 1.0  # the first pass is never right


def test_combine_replaces_exactly_the_faces_under_the_margin() -> None:
    first, whole, _ = problem(3, 50)
    margin = float(np.median(cascade.margins(first)))
    asked: list[np.ndarray] = []
    def run_whole(faces: np.ndarray) -> np.ndarray:
        asked.append(faces)
        return whole[faces]
    got = cascade.combine(first, np.arange(50), run_whole, margin)
    under = cascade.margins(first) < margin
    assert len(asked) == 1 and np.array_equal(asked[0], np.flatnonzero(under))
    np.testing.assert_array_equal(got[under], whole[under])
    np.testing.assert_array_equal(got[~under], first[~under])
    assert cascade.combine(first, np.arange(50), lambda f: pytest.fail("nothing to send"), 0.0).shape == first.shape
