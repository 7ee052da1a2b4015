"""The router's pure helpers (no Ray, no vLLM): variant choice, serving metrics and its own error bodies."""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from kubeforge.rollout.queries import (
    CANDIDATE,
    GENERATED_TOKENS_TOTAL,
    INTER_TOKEN_SECONDS,
    PROMPT_TOKENS_TOTAL,
    REQUEST_SECONDS,
    REQUESTS_IN_FLIGHT,
    REQUESTS_TOTAL,
    STABLE,
    TTFT_SECONDS,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestError(Exception):
    """A client error answered with `status` and a message naming the field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def check_weight(weight: Any) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"weight: the candidate's share must be an integer percent within 0..100 (got {weight!r})")
    return weight


def pick_variant(weight: int, has_candidate: bool, sticky_value: str | None) -> str:
    """"candidate" for `weight` percent of requests (or of sticky header values), else "stable"."""
    if not has_candidate or weight <= 0:
        return STABLE
    if weight >= 100:
        return CANDIDATE
    if sticky_value is not None:
        # A stable hash (not Python's salted hash()): a client keeps its variant across router restarts,
        # and raising the weight only moves clients from stable to candidate, never back.
        bucket = int.from_bytes(hashlib.sha256(sticky_value.encode()).digest()[:8], "big") % 100
    else:
        bucket = random.randrange(100)
    return CANDIDATE if bucket < weight else STABLE


class Metrics:
    """The serving metrics of `kubeforge.rollout.queries`, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("model", "version", "variant")
        # prometheus_client appends `_total` to counter names itself: give them without it.
        self.requests = Counter(REQUESTS_TOTAL.removesuffix("_total"), "Requests answered, by HTTP status.",
                                [*labels, "status"], registry=self.registry)
        self.latency = Histogram(REQUEST_SECONDS, "Whole-request latency.", labels, buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram(TTFT_SECONDS, "Time to first token.", labels, buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.inter_token = Histogram(INTER_TOKEN_SECONDS, "Time between generated tokens.", labels,
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PROMPT_TOKENS_TOTAL.removesuffix("_total"), "Prompt tokens.", labels,
                                     registry=self.registry)
        self.generated_tokens = Counter(GENERATED_TOKENS_TOTAL.removesuffix("_total"), "Generated tokens.",
                                        labels, registry=self.registry)
        self.in_flight = Gauge(REQUESTS_IN_FLIGHT, "Requests being answered.", labels, registry=self.registry)


class Outcome:
    """The metrics of one request to one variant; `finish` records it (once; later calls do nothing)."""

    def __init__(self, metrics: Metrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels
        self.start = self.last = time.perf_counter()
        self.seen_first = False
        self.done = False
        metrics.in_flight.labels(**labels).inc()

    def prompt(self, tokens: int) -> None:
        self.metrics.prompt_tokens.labels(**self.labels).inc(tokens)

    def tokens(self, count: int) -> None:
        """`count` tokens arrived now (one engine step; usually 1)."""
        if count <= 0:
            return
        now = time.perf_counter()
        gaps = count
        if not self.seen_first:
            self.metrics.ttft.labels(**self.labels).observe(now - self.start)
            self.seen_first = True
            gaps = count - 1  # the first token's wait is the TTFT, not an inter-token gap
        for _ in range(gaps):
            # Tokens that arrive together share the time since the previous step evenly.
            self.metrics.inter_token.labels(**self.labels).observe((now - self.last) / count)
        self.last = now
        self.metrics.generated_tokens.labels(**self.labels).inc(count)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(**self.labels, status=str(status)).inc()
        self.metrics.latency.labels(**self.labels).observe(time.perf_counter() - self.start)
        self.metrics.in_flight.labels(**self.labels).dec()


def error_body(status: int, message: str, field: str | None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": field, "code": status}}
