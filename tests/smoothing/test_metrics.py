import numpy as np
import pytest

from qrobust.smoothing import certified_accuracy_curve, summarize


def test_summary_by_hand():
    radius = np.array([0.0, 0.3, 0.8, 0.5, 0.0])
    correct = np.array([False, True, True, False, False])
    abstained = np.array([True, False, False, False, True])
    summary = summarize(radius, correct, abstained, radii=(0.0, 0.25, 0.5, 1.0))
    assert summary.certified_accuracy == pytest.approx((0.4, 0.4, 0.2, 0.0))
    assert summary.certified_accuracy_non_abstained == pytest.approx((2 / 3, 2 / 3, 1 / 3, 0.0))
    assert summary.certified_percentage == pytest.approx(0.6)
    assert summary.average_certified_radius == pytest.approx((0.3 + 0.8) / 5)
    assert summary.num_examples == 5


def test_abstained_examples_never_count_as_certified():
    summary = summarize(np.zeros(3), np.ones(3, dtype=bool), np.ones(3, dtype=bool))
    assert summary.certified_accuracy[0] == 0.0 and summary.certified_percentage == 0.0
    assert np.isnan(summary.certified_accuracy_non_abstained[0])


def test_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="equal length"):
        summarize(np.zeros(3), np.zeros(2, dtype=bool), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        summarize(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))


def test_curve_is_non_increasing_and_starts_at_clean_certified_accuracy():
    rng = np.random.default_rng(0)
    radius = rng.uniform(0, 1, 100)
    correct = rng.uniform(size=100) < 0.8
    abstained = rng.uniform(size=100) < 0.1
    grid, accuracy = certified_accuracy_curve(radius, correct, abstained)
    assert grid[0] == 0.0 and np.all(np.diff(accuracy) <= 0)
    assert accuracy[0] == pytest.approx(np.mean(correct & ~abstained))
    assert accuracy[-1] == 0.0
