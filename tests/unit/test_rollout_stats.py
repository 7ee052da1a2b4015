"""A/B statistics, checked against scipy's own tests on the same data."""

from __future__ import annotations

import math
import time

import pytest
from scipy import stats

from kubeforge.rollout.stats import compare_error_rates, compare_histograms

pytestmark = pytest.mark.unit

BOUNDS = [0.1, 0.25, 0.5, 1.0, math.inf]


def cumulative(counts: list[int], bounds: list[float] = BOUNDS) -> list[tuple[float, float]]:
    """Per-bucket counts as Prometheus reports them: cumulative, one sample per `le`."""
    total, out = 0, []
    for le, count in zip(bounds, counts, strict=True):
        total += count
        out.append((le, float(total)))
    return out


def expand(counts: list[int]) -> list[int]:
    return [i for i, count in enumerate(counts) for _ in range(count)]


# --- error rates ----------------------------------------------------------------------------------------


def test_clearly_different_error_rates_give_the_lower_one_the_win() -> None:
    result = compare_error_rates(10, 10_000, 100, 10_000, alpha=0.05, min_samples=100)
    chi2, p, _, _ = stats.chi2_contingency([[10, 9_990], [100, 9_900]], correction=False)
    assert result.test == "two_proportion_z"
    assert result.statistic is not None and result.p_value is not None
    assert result.statistic == pytest.approx(-math.sqrt(chi2), rel=1e-9)  # candidate lower: negative z
    assert result.p_value == pytest.approx(p, rel=1e-6)
    assert result.p_value < 1e-15
    assert result.winner == "candidate"
    assert (result.candidate.samples, result.candidate.error_rate) == (10_000, 0.001)
    assert (result.stable.samples, result.stable.error_rate) == (10_000, 0.01)
    assert result.reason.startswith("candidate 0.100% of 10000 vs stable 1.000% of 10000; two_proportion_z p=")
    assert result.reason.endswith("< alpha 0.05: candidate has a lower error rate")


def test_a_worse_candidate_loses() -> None:
    result = compare_error_rates(100, 10_000, 10, 10_000, alpha=0.05, min_samples=100)
    assert result.winner == "stable"


def test_identical_error_rates_have_no_winner() -> None:
    result = compare_error_rates(50, 5_000, 50, 5_000, alpha=0.05, min_samples=100)
    assert (result.test, result.statistic, result.p_value, result.winner) == ("two_proportion_z", 0.0, 1.0, None)
    none_at_all = compare_error_rates(0, 5_000, 0, 5_000, alpha=0.05, min_samples=100)
    assert (none_at_all.p_value, none_at_all.winner) == (1.0, None)


def test_small_counts_use_fishers_exact_test() -> None:
    # 8 errors in 400 requests: an expected count of 4 per variant, too few for the normal approximation.
    result = compare_error_rates(0, 200, 8, 200, alpha=0.05, min_samples=100)
    odds, p = stats.fisher_exact([[0, 200], [8, 192]])
    assert result.test == "fisher_exact"
    assert (result.statistic, result.p_value) == (pytest.approx(odds), pytest.approx(p, rel=1e-12))
    assert result.p_value is not None and 0.001 < result.p_value < 0.05
    assert result.winner == "candidate"
    assert compare_error_rates(1, 200, 3, 200, alpha=0.05, min_samples=100).winner is None


def test_extrapolated_float_counts_are_rounded_to_requests() -> None:
    result = compare_error_rates(9.6, 9_999.7, 100.2, 10_000.4, alpha=0.05, min_samples=100)
    assert (result.candidate.samples, result.stable.samples) == (10_000, 10_000)
    assert result.candidate.error_rate == 0.001


def test_too_few_requests_are_inconclusive() -> None:
    result = compare_error_rates(0, 99, 50, 99, alpha=0.05, min_samples=100)
    assert (result.test, result.statistic, result.p_value, result.winner) == ("none", None, None, None)
    assert result.reason == "inconclusive: too few samples (candidate 99, stable 99; min_samples 100 per variant)"


def test_impossible_counts_are_errors() -> None:
    with pytest.raises(ValueError, match="candidate: more errors"):
        compare_error_rates(11, 10, 0, 10, alpha=0.05, min_samples=1)
    with pytest.raises(ValueError, match="stable: counts must not be negative"):
        compare_error_rates(0, 10, -3, 10, alpha=0.05, min_samples=1)


# --- histograms ------------------------------------------------------------------------------------------


FAST = [400, 400, 150, 40, 10]
SLOW = [100, 300, 400, 150, 50]


def test_a_faster_candidate_wins_and_u_matches_scipy_on_the_expanded_samples() -> None:
    result = compare_histograms(cumulative(FAST), cumulative(SLOW), alpha=0.05, min_samples=100)
    reference = stats.mannwhitneyu(expand(FAST), expand(SLOW), method="asymptotic")
    assert result.test == "mann_whitney_u"
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-6)
    assert result.p_value is not None and result.p_value < 1e-30
    assert result.winner == "candidate"
    assert (result.candidate.samples, result.candidate.median_le) == (1000, 0.25)
    assert (result.stable.samples, result.stable.median_le) == (1000, 0.5)
    assert result.reason.endswith("< alpha 0.05: candidate has lower latency")


def test_a_slower_candidate_loses_on_ttft() -> None:
    result = compare_histograms(cumulative(SLOW), cumulative(FAST), alpha=0.05, min_samples=100, metric="ttft")
    assert (result.metric, result.winner) == ("ttft", "stable")


def test_a_small_shift_matches_scipy_and_is_not_significant() -> None:
    a, b = [200, 300, 300, 150, 50], [195, 300, 305, 150, 50]
    result = compare_histograms(cumulative(a), cumulative(b), alpha=0.05, min_samples=100)
    reference = stats.mannwhitneyu(expand(a), expand(b), method="asymptotic")
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert 0.5 < reference.pvalue < 1.0
    assert result.winner is None


def test_identical_histograms_have_no_winner() -> None:
    result = compare_histograms(cumulative(SLOW), cumulative(SLOW), alpha=0.05, min_samples=100)
    assert (result.statistic, result.p_value, result.winner) == (500_000.0, 1.0, None)
    same_bucket = compare_histograms(cumulative([0, 500, 0, 0, 0]), cumulative([0, 500, 0, 0, 0]), 0.05, 100)
    assert (same_bucket.p_value, same_bucket.winner) == (1.0, None)


def test_too_few_observations_are_inconclusive() -> None:
    result = compare_histograms(cumulative([50, 40, 5, 0, 0]), cumulative(SLOW), alpha=0.05, min_samples=100)
    assert (result.test, result.p_value, result.winner) == ("none", None, None)
    assert result.candidate.samples == 95
    assert result.reason.startswith("inconclusive: too few samples (candidate 95, stable 1000")
    empty = compare_histograms([], cumulative(SLOW), alpha=0.05, min_samples=1)
    assert (empty.candidate.samples, empty.candidate.median_le, empty.winner) == (0, None, None)


def test_buckets_may_arrive_unsorted_and_dip_from_extrapolation() -> None:
    # increase() extrapolates each bucket series on its own: 0.25's cumulative count dips below 0.1's.
    candidate = [(math.inf, 1000.2), (0.25, 399.6), (0.1, 400.3), (1.0, 990.0), (0.5, 950.0)]
    result = compare_histograms(candidate, cumulative(SLOW), alpha=0.05, min_samples=100)
    assert result.candidate.samples == 400 + 0 + 550 + 40 + 10
    assert result.candidate.median_le == 0.5


def test_different_bucket_bounds_are_an_error() -> None:
    with pytest.raises(ValueError, match="different buckets"):
        compare_histograms(cumulative(FAST), cumulative(SLOW, [0.1, 0.2, 0.5, 1.0, math.inf]), 0.05, 100)


def test_millions_of_requests_take_no_time() -> None:
    began = time.perf_counter()
    result = compare_histograms(cumulative([x * 10_000 for x in FAST]), cumulative([x * 10_000 for x in SLOW]),
                                alpha=0.05, min_samples=100)
    assert time.perf_counter() - began < 0.1
    assert (result.candidate.samples, result.winner, result.p_value) == (10_000_000, "candidate", 0.0)
