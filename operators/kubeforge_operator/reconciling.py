"""What the pipeline and deployment reconcilers share: one reconciliation at a time per object, status
writes that only send news, and the Invalid status of a spec that does not validate."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from kubeforge.errors import SpecError
from kubeforge_operator import kube
from kubeforge_operator.conditions import invalid_status

# The create/update handler, timers and child-object events of one object must not interleave. Weak
# values: a lock lives as long as someone holds or awaits it, so deleted objects leave nothing behind.
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def object_lock(kind: str, namespace: str, name: str) -> asyncio.Lock:
    key = f"{kind}/{namespace}/{name}"
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = asyncio.Lock()
    return lock


async def write_status(client: kube.Client, url: str, previous: dict[str, Any], status: Mapping[str, Any]) -> None:
    """Write `status` into the object's status subresource at `url`, unless nothing changed.

    Each top-level key of `status` is written whole (None removes it) and the others are left as they
    are, so a caller may write the rollout alone. Within a key, the merge patch nulls what the new value
    leaves out: a JSON merge patch merges maps, and the message of a failed attempt would otherwise
    outlive it. Every write is a watch event that wakes kopf (and our handlers) again, so only news is
    written. `previous` is updated to what is now stored, so later writes in the same reconciliation
    compare against it."""
    plain = json.loads(json.dumps(status))  # as the API server returns it: lists, not tuples
    patch = {key: value for key, value in _changes(previous, plain).items() if key in plain}
    if not patch:
        return
    await client.merge_patch(url, {"status": patch})
    for key, value in plain.items():
        if value is None:
            previous.pop(key, None)  # what the merge patch did
        else:
            previous[key] = _without_nulls(value)


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `before` into `after`."""
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            inner = _changes(old, value)
            if inner:
                patch[key] = inner
        elif value != old:
            patch[key] = value  # nulls within a map that replaces a non-map remove nothing: harmless
    return patch


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


async def write_invalid(client: kube.Client, url: str, previous: dict[str, Any], error: SpecError, *,
                        now: datetime, generation: int | None, logger: kopf.Logger) -> None:
    """Status Invalid, with a condition naming every bad field; the caller then creates nothing."""
    problems = [str(p) for p in error.problems]
    logger.warning(f"invalid spec, nothing created: {'; '.join(problems)}")
    await write_status(client, url, previous,
                       invalid_status(problems, previous=previous, now=now, generation=generation))
