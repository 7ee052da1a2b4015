"""TEST-ONLY fault injection on a variant: used by tests of the rollout machinery, never by `kubeforge serve`.

The router applies it (`Router.set_faults`), after validation and before the engine: a failed request is
counted under the variant like a real engine failure, and a delay shows in its latency and TTFT.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    fail_rate: float = 0.0
    """Share of requests answered 503 (0..1)."""
    delay_s: float = 0.0
    """Seconds added before the first token."""

    def injects(self) -> bool:
        return self.fail_rate > 0 or self.delay_s > 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"Faults.fail_rate must be within 0..1 (got {self.fail_rate})")
        if self.delay_s < 0:
            raise ValueError(f"Faults.delay_s must not be negative (got {self.delay_s})")
