"""Status conditions as Kubernetes conventions want them, and the status of a spec that is Invalid.

Shared by both status builders (`rayjob.pipeline_status`, `rayservice.deployment_status`): a condition's
`lastTransitionTime` moves only when its status does, which needs the status before and `now`, both
passed in (nothing here reads the clock).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

MAX_MESSAGE = 32768
"""The CRDs' maxLength of a condition's message."""


def condition(kind: str, status: str, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    """One condition, without its lastTransitionTime (`keep_transition_times` sets it)."""
    out: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message[:MAX_MESSAGE]}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def spec_accepted(generation: int | None) -> dict[str, Any]:
    """`Valid=True`: every status but the Invalid one starts with it."""
    return condition("Valid", "True", "SpecAccepted", "kubeforge.spec accepted the spec", generation)


def invalid_status(
    problems: Sequence[str], *, previous: Mapping[str, Any], now: datetime, generation: int | None
) -> dict[str, Any]:
    """The status of a spec the operator rejects: each problem starts with the field at fault."""
    message = "; ".join(problems)
    status: dict[str, Any] = {
        "phase": "Invalid",
        "conditions": keep_transition_times(
            [condition("Valid", "False", "InvalidSpec", message, generation)], previous, now
        ),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def keep_transition_times(
    conditions: list[dict[str, Any]], previous: Mapping[str, Any], now: datetime
) -> list[dict[str, Any]]:
    """lastTransitionTime moves only when a condition's status does, as Kubernetes conventions ask."""
    before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    out = []
    for new in conditions:
        old = before.get(new["type"])
        if old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime"):
            out.append({**new, "lastTransitionTime": old["lastTransitionTime"]})
        else:
            out.append({**new, "lastTransitionTime": format_time(now)})
    return out


def parse_time(value: Any) -> datetime | None:
    """A timestamp of a Kubernetes object (RFC 3339); None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes its own timestamps."""
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
