"""Errors with retry semantics: what the operator met, turned into what kopf should do about it.

kopf retries a handler that raises `TemporaryError` after its delay and gives up on one that raises
`PermanentError`; anything else it retries with its default backoff, which is right only for bugs.

`FieldError` is how the pure builders refuse their input: the field at fault and what to do about it,
kept apart so that a reconciler puts them in a status without parsing the message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import kopf
from kopf._cogs.clients import errors as api_errors

from kubeforge.errors import KubeForgeError, Problem

CONFLICT_DELAY_S = 1.0
"""Someone else changed the object between our read and our write: read again almost at once."""
SERVER_DELAY_S = 10.0
"""The API server is unwell (5xx, throttling) or we lack a permission an admin may still grant."""


class FieldError(KubeForgeError, ValueError):
    """A spec field (`spec.cluster`) or an operator variable (`KUBEFORGE_OPERATOR_*`) the operator cannot
    work with, and what to do about it. Reconcilers read `field` and `message` (or `problem`) as they are.

    A `KubeForgeError`, so one that escapes a reconciliation is permanent (`retry_semantics`); a
    `ValueError`, as a builder's refusal of its arguments has always been."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def problem(self) -> Problem:
        """As one problem of a `SpecError`, the form the Invalid status is written from."""
        return Problem(self.field, self.message)


@contextmanager
def retry_semantics() -> Iterator[None]:
    """Re-raise what the body raises as the kopf error that says whether and when to try again."""
    try:
        yield
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except KubeForgeError as exc:
        # The user's input is wrong: retrying cannot help until they change it, which kopf notices.
        raise kopf.PermanentError(str(exc)) from exc
    except api_errors.APIConflictError as exc:
        raise kopf.TemporaryError(f"conflict: {exc.message or exc}", delay=CONFLICT_DELAY_S) from exc
    except (api_errors.APIServerError, api_errors.APITooManyRequestsError, api_errors.APIForbiddenError) as exc:
        raise kopf.TemporaryError(f"API server: {exc.status} {exc.message or exc}", delay=SERVER_DELAY_S) from exc
    except api_errors.APIClientError as exc:
        # 4xx other than the above: the object we sent is wrong (a bug here), resending it changes nothing.
        raise kopf.PermanentError(f"API rejected a request: {exc.status} {exc.message or exc}") from exc
