"""URLs that may carry credentials (an Optuna storage, a tracking URI): told apart and redacted.

A password in a manifest ends up in plain text in the ModelPipeline, its ConfigMap, the RayJobs and
MLflow; on a cluster it comes from a Secret instead, and wherever a URL is printed or logged, its
password is not."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Query parameters that hold a credential in the URLs of databases and object stores.
SECRET_PARAMETERS = {"password", "passwd", "pwd", "secret", "token", "sslpassword", "access_token", "api_key"}
MASK = "***"


def has_password(url: str) -> bool:
    """Whether `url` carries a credential: a password after the user name, or a secret query parameter."""
    parts = urlsplit(url)
    return parts.password is not None or any(k.lower() in SECRET_PARAMETERS for k, _ in parse_qsl(parts.query))


def redact_url(url: str) -> str:
    """`postgresql://user:secret@host/db?password=x` -> `postgresql://user:***@host/db?password=***`."""
    if not has_password(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:{MASK}@{host}"
    query = urlencode([(k, MASK if k.lower() in SECRET_PARAMETERS else v) for k, v in parse_qsl(parts.query)],
                      safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub(text: str, url: str) -> str:
    """`text` (an error message, which may quote `url` itself) with `url`'s credentials masked."""
    parts = urlsplit(url)
    password = parts.password or ""  # as written in the URL: a message may quote it so, or decoded
    secrets = {password, unquote(password), *(v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_PARAMETERS)}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
