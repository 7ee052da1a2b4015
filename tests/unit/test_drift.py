"""Each drift statistic on synthetic samples: no drift stays below the usual threshold, a planted shift
goes above it, and the direction and size of a shift show in the value."""

from __future__ import annotations

import numpy as np
import pytest

from kubeforge.monitor.drift import Signal, ks, loglik_shift, psi, token_counts, token_js

pytestmark = pytest.mark.unit


def _lengths(seed: int, mean: float, n: int = 2000) -> list[float]:
    return list(np.random.default_rng(seed).normal(mean, 20, n).round())


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shifted_one() -> None:
    reference = _lengths(0, 100)
    assert psi(reference, _lengths(1, 100)) < 0.1
    moderate, major = psi(reference, _lengths(2, 110)), psi(reference, _lengths(3, 140))
    assert 0.1 < moderate < 0.25 < major
    # Shifts down count as much as shifts up.
    assert psi(reference, _lengths(4, 60)) > 0.25
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)


def test_psi_survives_bins_the_current_window_leaves_empty() -> None:
    reference = _lengths(0, 100)
    value = psi(reference, [500.0] * 50)  # every current value beyond the reference's range
    assert np.isfinite(value) and value > 5


def test_ks_detects_a_shift_and_not_a_resample() -> None:
    reference = _lengths(0, 100)
    same, p_same = ks(reference, _lengths(1, 100))
    shifted, p_shifted = ks(reference, _lengths(2, 115))
    assert same < 0.06 < shifted and p_same > 0.01 > p_shifted


def test_token_js_is_zero_for_equal_frequencies_and_one_for_disjoint_vocabularies() -> None:
    rng = np.random.default_rng(0)
    vocabulary = np.arange(200)
    weights = rng.dirichlet(np.ones(200))
    sample = lambda seed, w: token_counts([list(np.random.default_rng(seed).choice(vocabulary, 5000, p=w))])  # noqa: E731
    reference = sample(1, weights)
    assert token_js(reference, sample(2, weights)) < 0.02
    shifted = weights.copy()
    shifted[:20] *= 20  # a planted shift: twenty tokens become far more common
    assert token_js(reference, sample(3, shifted / shifted.sum())) > 0.1
    assert token_js({1: 5, 2: 5}, {3: 4}) == pytest.approx(1.0)
    assert token_js({1: 5, 2: 5}, {2: 1, 1: 1}) == pytest.approx(0.0)


def test_loglik_shift_is_positive_when_traffic_is_less_likely_under_the_champion() -> None:
    assert loglik_shift([2.0, 2.2, 1.8], [3.0, 3.2]) == pytest.approx(1.1)
    assert loglik_shift([2.0, 2.2], [1.0]) < 0
    with pytest.raises(ValueError, match="prompts on both sides"):
        loglik_shift([], [1.0])


def test_a_signal_crosses_only_above_its_threshold() -> None:
    assert Signal("psi", 0.3, 0.25, 100, 100).crossed
    assert not Signal("psi", 0.25, 0.25, 100, 100).crossed
    assert not Signal("psi", 0.1, 0.25, 100, 100).crossed
