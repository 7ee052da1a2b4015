"""Drift statistics between a reference sample (the champion's training data, or an earlier window of
traffic) and recent traffic (pure functions over numbers and token counts).

* `psi`: the population stability index of a numeric feature (prompt length), over bins cut at the
  reference's quantiles: sum((c - r) x ln(c / r)). The usual reading: below 0.1 stable, 0.1 to 0.25 a
  moderate shift, above 0.25 a major one.
* `ks`: the two-sample Kolmogorov-Smirnov statistic (the largest gap between the two empirical CDFs, in
  [0, 1]) and its p-value, from scipy.
* `token_js`: the Jensen-Shannon divergence (base 2, in [0, 1]) between the token frequencies of the
  two samples under the champion's tokenizer.
* `loglik_shift`: how much lower the mean per-token log-likelihood of recent prompts is under the
  champion than the reference's (nats per token; positive: the model finds the traffic less familiar).

Small samples make every statistic noisy: `Signal` carries the sample sizes, and callers refuse to
decide below a minimum (no trigger on missing data).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PSI_EPS = 1e-4
"""Floor of a bin's share: an empty bin on one side would make the index infinite."""


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `current` against `reference`, over `bins` reference quantile bins."""
    if not reference or not current:
        raise ValueError("psi needs values on both sides")
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    # Inner edges at the reference's quantiles (repeated values collapse bins); the outer bins are open.
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    ref_share, cur_share = np.maximum(ref_share, PSI_EPS), np.maximum(cur_share, PSI_EPS)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def ks(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic and its p-value."""
    from scipy.stats import ks_2samp

    if not reference or not current:
        raise ValueError("ks needs values on both sides")
    result = ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    return float(result.statistic), float(result.pvalue)


def token_js(reference: Mapping[int, int], current: Mapping[int, int]) -> float:
    """Jensen-Shannon divergence (base 2) between two token count tables."""
    ref_total, cur_total = sum(reference.values()), sum(current.values())
    if not ref_total or not cur_total:
        raise ValueError("token_js needs tokens on both sides")
    divergence = 0.0
    for token in set(reference) | set(current):
        p, q = reference.get(token, 0) / ref_total, current.get(token, 0) / cur_total
        m = (p + q) / 2
        if p:
            divergence += p / 2 * math.log2(p / m)
        if q:
            divergence += q / 2 * math.log2(q / m)
    return divergence


def token_counts(rows: Sequence[Sequence[int]]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for row in rows:
        counts.update(row)
    return counts


def loglik_shift(reference_nll: Sequence[float], current_nll: Sequence[float]) -> float:
    """Mean per-token negative log-likelihood of the current prompts minus the reference's (nats/token)."""
    if not reference_nll or not current_nll:
        raise ValueError("loglik_shift needs prompts on both sides")
    return float(np.mean(current_nll) - np.mean(reference_nll))


@dataclass(frozen=True)
class Signal:
    """One drift statistic of one window, and whether it crossed its threshold."""

    name: str
    value: float
    threshold: float
    reference_size: int
    current_size: int

    @property
    def crossed(self) -> bool:
        return self.value > self.threshold
