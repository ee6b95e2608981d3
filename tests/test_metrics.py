"""Accuracy, margin loss and the membership-inference balanced accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate.metrics import accuracy, loss_from_margin, mia_balanced_accuracy


def _margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z_y = np.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = logits.copy()
    np.put_along_axis(others, labels[:, None], -np.inf, axis=1)
    return z_y - np.logaddexp.reduce(others, axis=1)


def test_accuracy_from_margins():
    assert accuracy(np.array([1.0, -1.0, 0.5, 0.0])) == 0.5  # 0 is not correct
    per_model = accuracy(np.array([[1.0, 2.0], [-1.0, 3.0]]))
    np.testing.assert_array_equal(per_model, [1.0, 0.5])


def test_accuracy_from_logits():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 3.0]])
    assert accuracy(logits, np.array([0, 2, 2])) == pytest.approx(2 / 3)
    stacked = np.stack([logits, -logits])
    assert accuracy(stacked, np.array([0, 2, 2])).shape == (2,)


def test_margin_accuracy_is_stricter_than_top1():
    logits = np.array([[1.0, 0.9, 0.9]])
    labels = np.array([0])
    assert accuracy(logits, labels) == 1.0
    assert accuracy(_margins(logits, labels)) == 0.0  # softmax_y < 1/2


def test_loss_from_margin_is_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(200, 10))
    labels = rng.integers(0, 10, size=200)
    log_softmax = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ce = -np.take_along_axis(log_softmax, labels[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(loss_from_margin(_margins(logits, labels)), ce, rtol=1e-10)


def test_loss_from_margin_is_stable():
    out = loss_from_margin(np.array([0.0, 1000.0, -1000.0]))
    np.testing.assert_allclose(out, [math.log(2), 0.0, 1000.0])


def test_mia_separable_and_identical():
    assert mia_balanced_accuracy([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert mia_balanced_accuracy([1.0, 2.0], [0.1, 0.2, 0.3]) == 1.0  # either direction
    x = np.random.default_rng(1).exponential(size=(5, 40))
    assert mia_balanced_accuracy(x, x.copy()) == 0.5
    assert mia_balanced_accuracy([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


def test_mia_hand_case():
    # CDFs at thresholds 1..6: F_u = 1/4, 1/2, 3/4, 1, 1, 1; F_o = 0, 0, 1/4, 1/2, 3/4, 1.
    # Best gap 1/2 (threshold 2, 3 or 4) -> balanced accuracy 3/4.
    u, o = [1, 2, 3, 4], [3, 4, 5, 6]
    assert mia_balanced_accuracy(u, o) == 0.75
    assert mia_balanced_accuracy(o, u) == 0.75
    # Unequal sizes: threshold 0 catches all of u and half of o -> (1 + 1/2) / 2.
    assert mia_balanced_accuracy([0.0], [0.0, 1.0]) == 0.75


def test_mia_matches_exhaustive_thresholds():
    rng = np.random.default_rng(2)
    u = np.round(rng.normal(0, 1, size=57), 1)
    o = np.round(rng.normal(0.4, 1.2, size=31), 1)
    best = 0.5
    for t in np.concatenate([[-np.inf], u, o]):
        ba = 0.5 * (np.mean(u <= t) + np.mean(o > t))
        best = max(best, ba, 1 - ba)
    assert mia_balanced_accuracy(u, o) == pytest.approx(best, abs=1e-15)


def test_mia_bad_inputs():
    with pytest.raises(ValueError):
        mia_balanced_accuracy([], [1.0])
    with pytest.raises(ValueError):
        mia_balanced_accuracy([np.nan], [1.0])
