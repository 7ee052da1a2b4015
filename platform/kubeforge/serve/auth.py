"""The bearer token of a deployment's `auth` section."""

from __future__ import annotations

import os
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.spec.deployment import AuthSpec

TOKEN_SECRET_OFF_CLUSTER = (
    "spec.auth.token_secret: names a Kubernetes Secret, which only the RayService pods the operator creates "
    "can read; locally use token_env or token_file"
)


def require_local_source(auth: AuthSpec | None) -> None:
    """Refuse a token source this process cannot read before anything starts (`kubeforge serve`)."""
    if auth is not None and auth.token_secret is not None:
        raise KubeForgeError(TOKEN_SECRET_OFF_CLUSTER)


def read_token(auth: AuthSpec) -> str:
    """The token from auth.token_env or auth.token_file, without surrounding whitespace. On Kubernetes the
    operator has already turned a token_secret into a token_env of the pods, so one never reaches here."""
    require_local_source(auth)
    if auth.token_env is not None:
        token = os.environ.get(auth.token_env, "").strip()
        where = f"environment variable {auth.token_env} (auth.token_env)"
    else:
        assert auth.token_file is not None  # AuthSpec requires exactly one source
        try:
            token = Path(auth.token_file).read_text().strip()
        except OSError as exc:
            raise KubeForgeError(f"auth.token_file: cannot read {auth.token_file} ({exc.strerror})") from exc
        where = f"file {auth.token_file} (auth.token_file)"
    if not token:
        raise KubeForgeError(f"the bearer token in {where} is empty or unset; set it before serving")
    return token
