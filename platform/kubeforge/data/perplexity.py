"""Perplexity filtering with a character n-gram language model (interpolated Kneser-Ney).

The model of order `N` is trained on the `reference` sources (at most `max_reference_chars`
characters, documents taken in source order). Each document is padded on the left with `N-1`
boundary characters, so every character has a full context. For a context `h` of `k-1` characters:

    P_k(c | h) = max(n_k(hc) - D_k, 0) / n_k(h.) + D_k * T_k(h) / n_k(h.) * P_{k-1}(c | h[1:])

where, for the highest order, `n_N` is the raw count of the n-gram; for lower orders it is the
*continuation count*, the number of distinct characters seen before it (Kneser-Ney's key idea: a
character that follows many contexts is a better guess in an unseen one than one that is merely
frequent). `n_k(h.)` sums `n_k(hc)` over `c`, `T_k(h)` is the number of distinct `c` with
`n_k(hc) > 0`, and the discount is `D_k = n1 / (n1 + 2 n2)` from the counts of counts of order
`k`. A context never seen backs off entirely to the lower order. The recursion ends in the
unigram continuation distribution interpolated with a uniform distribution over the reference
alphabet plus one slot for unseen characters, so no probability is ever zero.

A document's score is its per-character perplexity `exp(-(1/L) * sum(log P(c_i | context)))`
over its `L` characters.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

BOUNDARY = "\x02"


@dataclass
class CharNgramModel:
    order: int
    counts: list[dict[str, int]]
    """counts[k-1]: n_k of every k-gram (raw counts for the highest order, continuation counts below)."""
    context_total: list[dict[str, int]]
    context_types: list[dict[str, int]]
    discounts: list[float]
    vocabulary_size: int

    def char_probability(self, history: str, char: str) -> float:
        probability = 1.0 / (self.vocabulary_size + 1)
        for k in range(1, self.order + 1):
            context = history[len(history) - (k - 1) :] if k > 1 else ""
            total = self.context_total[k - 1].get(context, 0)
            if total == 0:
                continue
            discount = self.discounts[k - 1]
            count = self.counts[k - 1].get(context + char, 0)
            types = self.context_types[k - 1][context]
            probability = max(count - discount, 0.0) / total + discount * types / total * probability
        return probability

    def perplexity(self, text: str) -> float:
        """Per-character perplexity of `text`; an empty text scores 1."""
        if not text:
            return 1.0
        padded = BOUNDARY * (self.order - 1) + text
        width = self.order - 1
        log_sum = 0.0
        for i in range(width, len(padded)):
            log_sum += math.log(self.char_probability(padded[i - width : i], padded[i]))
        return math.exp(-log_sum / len(text))


def _discount(counts: Iterable[int]) -> float:
    of_counts = Counter(c for c in counts if c <= 2)
    n1, n2 = of_counts[1], of_counts[2]
    if n1 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def train(texts: Iterable[str], order: int, max_chars: int) -> CharNgramModel:
    """Train on the texts in order until `max_chars` characters have been used."""
    highest: Counter[str] = Counter()
    alphabet: set[str] = set()
    used = 0
    for text in texts:
        if used >= max_chars:
            break
        text = text[: max_chars - used]
        used += len(text)
        alphabet.update(text)
        padded = BOUNDARY * (order - 1) + text
        highest.update(padded[i : i + order] for i in range(len(padded) - order + 1))
    counts: list[dict[str, int]] = [{} for _ in range(order)]
    counts[order - 1] = dict(highest)
    for k in range(order - 1, 0, -1):
        continuation: Counter[str] = Counter(gram[1:] for gram in counts[k])
        counts[k - 1] = dict(continuation)
    context_total: list[dict[str, int]] = []
    context_types: list[dict[str, int]] = []
    for k in range(order):
        totals: Counter[str] = Counter()
        types: Counter[str] = Counter()
        for gram, count in counts[k].items():
            totals[gram[:-1]] += count
            types[gram[:-1]] += 1
        context_total.append(dict(totals))
        context_types.append(dict(types))
    return CharNgramModel(
        order=order, counts=counts, context_total=context_total, context_types=context_types,
        discounts=[_discount(c.values()) for c in counts], vocabulary_size=len(alphabet),
    )


def perplexity_batch(texts: list[str], model: CharNgramModel) -> list[float]:
    return [model.perplexity(t) for t in texts]
