"""The audit trail of a registered model: one record per alias move or approval, who made it and why.

Records are kept as registered-model tags in MLflow (see `kubeforge.registry.client`), so the CLI, the
operator and an MLflow server see one history; the champion history `rollback` walks is replayed
from them.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from kubeforge.errors import KubeForgeError

CHALLENGER = "challenger"
CHAMPION = "champion"

AUDIT_TAG_PREFIX = "kubeforge.audit."
# MLflow's validator accepts registered-model tag values up to 100,000 characters, but the database
# column (`registered_model_tags.value`) is VARCHAR(5000): PostgreSQL and MySQL reject longer values
# even though SQLite stores them, so records are kept within 5000 characters on every backend.
MAX_AUDIT_CHARS = 5000
MAX_USER_CHARS = 256

PROMOTE = "promote"
ROLLBACK = "rollback"
APPROVE = "approve"


class RegistryError(KubeForgeError):
    """A registry operation was refused or named something that does not exist."""


@dataclass(frozen=True)
class AuditRecord:
    """One alias move or approval: who did what, when and why."""

    time: str
    """ISO-8601 UTC."""
    user: str
    action: str
    """promote | rollback | approve (other callers of `Registry.move_alias` may name their own)."""
    alias: str | None
    from_version: str | None
    """The version that held `alias` before; None when the alias was unset (and for approvals)."""
    to_version: str | None
    reason: str

    def to_json(self) -> str:
        # ensure_ascii=False: a non-ASCII reason would otherwise take six characters per letter of
        # the 5000 the tag column holds.
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AuditRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in ("time", "user", "action", "reason") if not isinstance(data.get(n), str)]
        if missing:
            raise ValueError(f"missing or non-string fields: {', '.join(missing)}")
        values: dict[str, Any] = {n: None if data.get(n) is None else str(data[n]) for n in names}
        return cls(**values)

    def summary(self) -> str:
        """One line for people: `champion: version 2 -> 3 (by alice: better ROUGE-L)`."""
        by = f"(by {self.user}: {self.reason})"
        if self.action == APPROVE:
            return f"version {self.to_version} approved {by}"
        before = f"version {self.from_version}" if self.from_version is not None else "none"
        after = self.to_version if self.from_version is not None else f"version {self.to_version}"
        verb = " rolled back" if self.action == ROLLBACK else ""
        return f"{self.alias}{verb}: {before} -> {after} {by}"

    def touches(self, version: str) -> bool:
        return version in (self.from_version, self.to_version)


def current_user() -> str:
    """KUBEFORGE_USER (set it in CI or in the operator's pod), else the login name, else "unknown"."""
    user = os.environ.get("KUBEFORGE_USER", "").strip()
    if user:
        return user
    try:
        # getpass raises when the uid has no passwd entry, which is common in containers.
        return getpass.getuser() or "unknown"
    except (OSError, KeyError, ImportError):
        return "unknown"


def require_reason(action: str, reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise RegistryError(f"{action}: a reason is required (it goes into the audit trail)")
    return reason


def fit(record: AuditRecord) -> AuditRecord:
    """Shorten the reason until the record fits one tag value; the reason is the only free-length field."""
    while (excess := len(record.to_json()) - MAX_AUDIT_CHARS) > 0:
        if not record.reason:
            raise RegistryError(f"audit record does not fit {MAX_AUDIT_CHARS} characters: {record.to_json()[:200]}")
        kept = max(0, len(record.reason.rstrip("…")) - excess - 1)
        record = replace(record, reason=record.reason[:kept] + "…")
    return record


def champion_history(records: list[AuditRecord]) -> list[str]:
    """The champion's versions, oldest first, as the audit records leave them: a move to champion
    pushes, a rollback pops back to the version it restored."""
    stack: list[str] = []
    for record in records:
        if record.alias != CHAMPION or record.to_version is None:
            continue
        if record.action == ROLLBACK:
            while stack and stack[-1] != record.to_version:
                stack.pop()
            if not stack:
                stack.append(record.to_version)
        else:
            stack.append(record.to_version)
    return stack
