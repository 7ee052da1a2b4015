"""Traffic and rollout drivers shared by the serving tests that run rollouts against a real Prometheus."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from kubeforge.rollout.controller import RolloutController, RolloutRecord
from kubeforge.rollout.prometheus import query_value
from kubeforge.rollout.queries import CANDIDATE, REQUESTS_TOTAL, selector
from kubeforge.serve.router import VARIANT_HEADER
from kubeforge.spec.deployment import CanaryRollout


class Traffic:
    """Requests to `model` (split by weight) from a background thread; (variant, status) of each."""

    def __init__(self, url: str, model: str, headers: dict[str, str]) -> None:
        self.url, self.model, self.headers = url, model, headers
        self.seen = Counter[tuple[str, int]]()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers=self.headers) as http:
            while not self.stop.is_set():
                response = http.post("/v1/completions", json={"model": self.model, "prompt": "x", "max_tokens": 1})
                with self.lock:
                    self.seen[response.headers.get(VARIANT_HEADER, "?"), response.status_code] += 1

    def snapshot(self) -> Counter[tuple[str, int]]:
        with self.lock:
            return Counter(self.seen)

    def by_variant(self, variant: str) -> int:
        return sum(n for (v, _), n in self.snapshot().items() if v == variant)

    def wait_for(self, more: int, limit_s: float = 120) -> None:
        """Until `more` requests beyond those answered now have been answered. The thread sends one request
        at a time, so after one more answer every request still to come was sent after this call."""
        target = self.snapshot().total() + more
        deadline = time.monotonic() + limit_s
        while self.snapshot().total() < target:
            assert self.thread.is_alive(), "the traffic thread has stopped"
            assert time.monotonic() < deadline, f"{more} more requests were not answered in {limit_s}s"
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def canary(prometheus: str, candidate: str, steps: list[dict]) -> CanaryRollout:
    """A canary to `candidate` with short analyses (4 s, over 8 s windows) that fails above 10% errors."""
    return CanaryRollout.model_validate({
        "strategy": "canary", "candidate": candidate, "steps": steps,
        "analysis": {"prometheus": prometheus, "interval_s": 4, "window": "8s", "max_error_rate": 0.1,
                     "failure_limit": 2, "inconclusive_limit": 5},
    })


def wait_until_the_candidate_is_idle(prometheus: str, model: str, version: str, limit_s: float = 120) -> None:
    """Until Prometheus holds no request to the candidate over a range longer than the analysis window (8 s).
    A range, not the current value: a scrape that failed just now would make that look idle too."""
    promql = f"sum(increase({REQUESTS_TOTAL}{selector(model, version, CANDIDATE)}[10s]))"
    deadline = time.monotonic() + limit_s
    while (value := query_value(prometheus, promql)) != 0:
        assert time.monotonic() < deadline, f"the candidate still had requests after {limit_s}s: {promql} = {value}"
        time.sleep(1)


def drive(controller: RolloutController, limit_s: float = 120) -> RolloutRecord:
    """Run `controller` from its start until its rollout ends."""
    record = controller.start(time.time())
    deadline = time.monotonic() + limit_s
    while not record.done:
        assert time.monotonic() < deadline, f"rollout still {record.phase} after {limit_s}s: {record.reason}"
        time.sleep(1)
        record = controller.tick(time.time())
    return record
