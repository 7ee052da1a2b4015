"""A/B comparisons between the candidate and the stable variant, from Prometheus counts.

Inputs are what `increase(...[duration])` returns over the test: request and 5xx counts for error rates,
cumulative histogram buckets for latencies. `increase()` extrapolates to the window's edges, so counts
arrive as floats; they are rounded to whole requests, which is within that extrapolation's own error.

Both tests are two-sided; the variant with the lower error rate, or the latency distribution shifted
down, wins when p < alpha. Fewer than `min_samples` requests on either side is inconclusive (no test is
run: p_value and winner are None), because a significant result on a handful of requests is mostly luck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Winner = Literal["candidate", "stable"]

FISHER_MIN_EXPECTED = 5.0
"""Below this expected count in any cell of the 2x2 table, the normal approximation of the two-proportion
z-test is poor (the usual rule of thumb for chi-square), so Fisher's exact test is used instead."""


@dataclass(frozen=True)
class VariantSummary:
    samples: int
    """Requests (error rates) or observations (histograms) of this variant over the test."""
    error_rate: float | None = None
    """Share of 5xx responses; None for histogram comparisons or without requests."""
    median_le: float | None = None
    """Upper bound (`le`) of the bucket holding the median, in seconds (may be inf); None for error rates."""


@dataclass(frozen=True)
class ABComparison:
    metric: str
    """"error_rate", "latency" or "ttft"."""
    test: str
    """"fisher_exact", "two_proportion_z", "mann_whitney_u", or "none" when there were too few samples."""
    statistic: float | None
    """Odds ratio (Fisher), z (two-proportion), or the candidate's U (Mann-Whitney); None without a test."""
    p_value: float | None
    candidate: VariantSummary
    stable: VariantSummary
    winner: Winner | None
    reason: str


def compare_error_rates(
    candidate_errors: float,
    candidate_total: float,
    stable_errors: float,
    stable_total: float,
    alpha: float,
    min_samples: int,
) -> ABComparison:
    """Two-proportion test of the 5xx share: Fisher's exact test for small counts, a pooled z-test otherwise."""
    ce, cn = _counts("candidate", candidate_errors, candidate_total)
    se, sn = _counts("stable", stable_errors, stable_total)
    cand = VariantSummary(cn, error_rate=ce / cn if cn else None)
    stab = VariantSummary(sn, error_rate=se / sn if sn else None)
    too_few = _too_few(cn, sn, min_samples)
    if too_few:
        return ABComparison("error_rate", "none", None, None, cand, stab, None, too_few)

    if _min_expected(ce, cn, se, sn) < FISHER_MIN_EXPECTED:
        from scipy.stats import fisher_exact  # scipy only on this path: importing kubeforge.rollout stays light

        odds, p = fisher_exact([[ce, cn - ce], [se, sn - se]])
        test, statistic, p_value = "fisher_exact", float(odds), float(p)
    else:
        test = "two_proportion_z"
        statistic = _two_proportion_z(ce, cn, se, sn)
        p_value = _two_sided_p(statistic)

    rates = f"candidate {_pct(cand.error_rate)} of {cn} vs stable {_pct(stab.error_rate)} of {sn}"
    winner: Winner | None = None
    if p_value < alpha and cand.error_rate != stab.error_rate:
        winner = "candidate" if (cand.error_rate or 0.0) < (stab.error_rate or 0.0) else "stable"
    return ABComparison("error_rate", test, statistic, p_value, cand, stab, winner,
                        _verdict(rates, test, p_value, alpha, winner, "a lower error rate"))


def compare_histograms(
    candidate_buckets: Sequence[tuple[float, float]],
    stable_buckets: Sequence[tuple[float, float]],
    alpha: float,
    min_samples: int,
    metric: str = "latency",
) -> ABComparison:
    """Mann-Whitney U test on two Prometheus histograms, each a list of (le, cumulative count).

    Buckets are ordered categories, so every observation in a bucket ties with the others there: U is
    computed from the per-bucket counts with mid-ranks, and its normal approximation uses the tie
    correction and continuity correction (what `scipy.stats.mannwhitneyu(method="asymptotic")` returns on
    the expanded samples, without building arrays of millions of requests). Both histograms must have
    the same bucket bounds (the same router code exports them).
    """
    cand_bounds, cand_counts = _per_bucket("candidate", candidate_buckets)
    stab_bounds, stab_counts = _per_bucket("stable", stable_buckets)
    n1, n2 = sum(cand_counts), sum(stab_counts)
    cand = VariantSummary(n1, median_le=_median_le(cand_bounds, cand_counts))
    stab = VariantSummary(n2, median_le=_median_le(stab_bounds, stab_counts))
    too_few = _too_few(n1, n2, min_samples)
    if too_few:
        return ABComparison(metric, "none", None, None, cand, stab, None, too_few)
    if cand_bounds != stab_bounds:
        raise ValueError(f"{metric}: the variants' histograms have different buckets "
                         f"(candidate {cand_bounds}, stable {stab_bounds})")

    u1, p_value = _mann_whitney(cand_counts, stab_counts)
    medians = (f"candidate median <= {_secs(cand.median_le)} of {n1} vs stable median <= {_secs(stab.median_le)} "
               f"of {n2}; P(candidate slower) = {u1 / (n1 * n2):.3f}")
    winner: Winner | None = None
    if p_value < alpha and u1 != n1 * n2 / 2:
        # U1 below its null mean: the candidate's observations rank lower, i.e. it is faster.
        winner = "candidate" if u1 < n1 * n2 / 2 else "stable"
    return ABComparison(metric, "mann_whitney_u", u1, p_value, cand, stab, winner,
                        _verdict(medians, "mann_whitney_u", p_value, alpha, winner, f"lower {metric}"))


# --- the tests themselves ---------------------------------------------------------------------------------


def _two_proportion_z(e1: int, n1: int, e2: int, n2: int) -> float:
    """Pooled two-proportion z (its square is Pearson's chi-square without continuity correction)."""
    pooled = (e1 + e2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:  # no errors at all, or nothing but errors: both rates are equal
        return 0.0
    return (e1 / n1 - e2 / n2) / se


def _mann_whitney(a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
    """(U of the first sample, two-sided p) from per-category counts, ties by mid-rank."""
    n1, n2 = sum(a), sum(b)
    n = n1 + n2
    rank_sum, below, ties = 0.0, 0, 0
    for x, y in zip(a, b, strict=True):
        t = x + y
        rank_sum += x * (below + (t + 1) / 2)  # every member of a tie gets the mean of its ranks
        below += t
        ties += t**3 - t
    u1 = rank_sum - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:  # every observation in one bucket: nothing to tell the variants apart
        return u1, 1.0
    z = (abs(u1 - mean) - 0.5) / math.sqrt(variance)  # same continuity correction as scipy
    return u1, min(1.0, _two_sided_p(max(z, 0.0)))


def _two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def _min_expected(e1: int, n1: int, e2: int, n2: int) -> float:
    n, errors = n1 + n2, e1 + e2
    return min(r * c / n for r in (n1, n2) for c in (errors, n - errors))


# --- inputs and summaries ------------------------------------------------------------------------------


def _counts(variant: str, errors: float, total: float) -> tuple[int, int]:
    e, n = round(errors), round(total)
    if e < 0 or n < 0:
        raise ValueError(f"{variant}: counts must not be negative (errors {errors}, total {total})")
    if e > n:
        raise ValueError(f"{variant}: more errors ({errors}) than requests ({total})")
    return e, n


def _per_bucket(variant: str, buckets: Sequence[tuple[float, float]]) -> tuple[list[float], list[int]]:
    """Bucket bounds in order and the count in each bucket (not cumulative)."""
    ordered = sorted((float(le), float(count)) for le, count in buckets)
    bounds = [le for le, _ in ordered]
    if len(set(bounds)) != len(bounds):
        raise ValueError(f"{variant}: duplicate bucket bounds in {bounds}")
    counts, previous = [], 0.0
    for _, cumulative in ordered:
        if cumulative < 0:
            raise ValueError(f"{variant}: negative bucket count {cumulative}")
        # increase() extrapolates each bucket series on its own, so a cumulative count can dip a little
        # below the bucket before it: that is an empty bucket, not a negative one.
        counts.append(max(0, round(cumulative - previous)))
        previous = max(previous, cumulative)
    return bounds, counts


def _median_le(bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    total = sum(counts)
    if total == 0:
        return None
    cumulative = 0
    for le, count in zip(bounds, counts, strict=True):
        cumulative += count
        if cumulative >= total / 2:
            return le
    return bounds[-1]


def _too_few(n1: int, n2: int, min_samples: int) -> str:
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1 (got {min_samples})")
    if n1 >= min_samples and n2 >= min_samples:
        return ""
    return f"inconclusive: too few samples (candidate {n1}, stable {n2}; min_samples {min_samples} per variant)"


def _verdict(summary: str, test: str, p: float, alpha: float, winner: Winner | None, better: str) -> str:
    if winner is None:
        return f"{summary}; {test} p={p:.3g} >= alpha {alpha:g}: no significant difference"
    return f"{summary}; {test} p={p:.3g} < alpha {alpha:g}: {winner} has {better}"


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.3%}"


def _secs(le: float | None) -> str:
    return "n/a" if le is None else ("+Inf" if math.isinf(le) else f"{le:g}s")
