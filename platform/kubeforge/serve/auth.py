"""The bearer token of a deployment's `auth` section."""

from __future__ import annotations

import os
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.spec.deployment import AuthSpec


def read_token(auth: AuthSpec) -> str:
    """The token from auth.token_env or auth.token_file, without surrounding whitespace."""
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
