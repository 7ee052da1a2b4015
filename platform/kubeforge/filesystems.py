"""Where source files live: the files a source's paths and globs name, and opening one of them.

A path is local (absolute, or relative to the manifest's directory) or an object-store URI. The one
scheme supported is `s3://bucket/key`, through pyarrow's native S3 filesystem: AWS S3 and
S3-compatible servers (MinIO; tests use moto's server). Other schemes are refused with a clear error:
pyarrow would take `gs://` and others too, but nothing here has tested them.

Used in the driver (listing: names, sizes and modification times only) and in Ray workers (reading).
Each process builds its S3 client from its own environment, which Ray workers inherit from the
process that started the runtime and which a cluster's stage pods get from a Secret:

* credentials: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the rest of the
  AWS SDK's default chain (`AWS_PROFILE`, a web identity token, ...); read by the SDK itself;
* region: `AWS_REGION` or `AWS_DEFAULT_REGION`; read by the SDK itself;
* endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (e.g. `http://minio:9000`). pyarrow reads
  these only in `FileSystem.from_uri`, which cannot bound timeouts or retries and asks AWS for the
  bucket's region when no endpoint is set, while `S3FileSystem()` ignores them
  (https://github.com/apache/arrow/issues/49643): so this module reads them and passes them on.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from kubeforge.errors import KubeForgeError

if TYPE_CHECKING:
    from pyarrow.fs import FileInfo, S3FileSystem

SCHEMES = ("s3",)
"""Object-store URI schemes `list_files` and `open_input` take."""

# A request that cannot connect within CONNECT_TIMEOUT_S, or receives nothing for REQUEST_TIMEOUT_S,
# fails; MAX_ATTEMPTS bounds the tries of each request (AWS's standard retry mode, with backoff). An
# unreachable endpoint thus fails in about 20 s and a silent one in under a minute, never hangs.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 15.0
MAX_ATTEMPTS = 3

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_AWS_ERROR = re.compile(r"AWS Error (\S+) during (\w+) operation: ?(.*?)(?: \(Request ID: [^)]*\))?$", re.DOTALL)
_CURL = re.compile(r"curlCode: \d+, ([^;]+)")
_AUTH_ERRORS = {
    "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_CLIENT_TOKEN_ID",
    "MISSING_AUTHENTICATION_TOKEN", "INCOMPLETE_SIGNATURE", "INVALID_SIGNATURE", "REQUEST_EXPIRED",
    "UNRECOGNIZED_CLIENT",
}
_NETWORK_ERRORS = {"NETWORK_CONNECTION", "REQUEST_TIMEOUT"}
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# What the AWS SDK finds credentials in besides the EC2/ECS metadata services: when none is set, an
# error from the store is reported as missing credentials.
_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


@dataclass(frozen=True)
class SourceFile:
    path: str
    """An absolute local path or a URI (`s3://bucket/key`)."""
    size: int
    mtime_ns: int


def is_uri(path: str) -> bool:
    """Whether `path` is a URI (`scheme://...`) rather than a local path."""
    return _URI.match(path) is not None


def check_uri(pattern: str) -> str | None:
    """What is wrong with an object-store path or glob, found without contacting the store (manifest
    validation runs offline); None when nothing is."""
    scheme, bucket, key = _split(pattern)
    if scheme not in SCHEMES:
        return f"unsupported scheme '{scheme}://' (supported: {', '.join(s + '://' for s in SCHEMES)})"
    if not bucket:
        return "no bucket name (expected s3://bucket/key)"
    if glob.has_magic(bucket):
        return f"the bucket name cannot be a glob ('{bucket}'); globs go in the key"
    if not key:
        return f"no key: name an object or a glob of keys, e.g. s3://{bucket}/corpus/*.jsonl"
    return None


def list_files(patterns: tuple[str, ...] | list[str], base_dir: Path) -> list[SourceFile]:
    """Every file the patterns match, sorted by path and each once; relative patterns are resolved
    against `base_dir`. Empty when nothing matches: the caller names the field.

    Globs (`*`, `?`, `[...]`, `**` for any number of directories) mean the same in object-store keys
    as in local paths, `/` separating directories; the bucket name cannot be a glob."""
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        if is_uri(pattern):
            for listed in _list_uri(pattern):
                found.setdefault(listed.path, listed)
            continue
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        for match in glob.glob(full, recursive=True):
            path = os.path.abspath(match)
            if path in found or not os.path.isfile(path):
                continue
            stat = os.stat(path)
            found[path] = SourceFile(path, stat.st_size, stat.st_mtime_ns)
    return [found[path] for path in sorted(found)]


def open_input(path: str) -> BinaryIO:
    """The file, opened for reading bytes, seekable; read in the calling process.

    `KubeForgeError` naming the path when it cannot be opened. An object store can still fail while
    the file is read: `input_error` turns that `OSError` into the same kind of one-line error."""
    if not is_uri(path):
        try:
            return open(path, "rb")
        except OSError as exc:
            raise input_error(path, exc) from None
    _check(path)
    _, bucket, key = _split(path)
    try:
        return cast(BinaryIO, _s3().open_input_file(f"{bucket}/{key}"))
    except OSError as exc:
        raise input_error(path, exc) from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file, locally (parent folders made) or to an object store; `KubeForgeError` naming the
    path when it cannot be written."""
    if not is_uri(path):
        target = Path(path)
        # Written aside and renamed: a reader listing the folder (the monitor following a capture) never
        # sees half a file. The hidden name matches no pattern of a source.
        partial = target.with_name(f".{target.name}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(data)
            os.replace(partial, target)
        except OSError as exc:
            raise KubeForgeError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return
    _check(path)
    _, bucket, key = _split(path)
    try:
        with _s3().open_output_stream(f"{bucket}/{key}") as stream:
            stream.write(data)
    except OSError as exc:
        raise _store_error(path, exc) from None


def input_error(path: str, exc: OSError) -> KubeForgeError:
    """The one-line error for `exc`, raised while opening or reading `path` (a local path or a URI)."""
    if not is_uri(path):
        if isinstance(exc, FileNotFoundError):
            return KubeForgeError(f"{path}: file vanished after the manifest was validated")
        return KubeForgeError(f"{path}: cannot read ({exc.strerror or exc})")
    # An object deleted while it is read fails as "INTERNAL_FAILURE during GetObject: Failed to flush
    # response stream" (pyarrow 25 against moto's server), which says nothing: ask whether it is there.
    match = _AWS_ERROR.search(str(exc))
    plausible = match is None or match.group(1) not in _NETWORK_ERRORS | _AUTH_ERRORS
    if isinstance(exc, FileNotFoundError) or (plausible and _gone(path)):
        return KubeForgeError(f"{path}: object vanished after it was listed (its key or bucket is gone)")
    return _store_error(path, exc)


# --- object stores --------------------------------------------------------------------------------

def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of `scheme://bucket/key`."""
    match = _URI.match(uri)
    if match is None:
        raise ValueError(f"not a URI: {uri}")
    bucket, _, key = match.group(2).partition("/")
    return match.group(1).lower(), bucket, key


def _check(uri: str) -> None:
    problem = check_uri(uri)
    if problem is not None:
        raise KubeForgeError(f"{uri}: {problem}")


def _list_uri(pattern: str) -> list[SourceFile]:
    from pyarrow.fs import FileSelector, FileType

    _check(pattern)
    _, bucket, key = _split(pattern)
    fs = _s3()
    parts = key.split("/")
    magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    try:
        if magic is None:
            infos = [fs.get_file_info(f"{bucket}/{key}")]
            prefix = ""
        else:
            prefix = "/".join([bucket, *parts[:magic]])
            rest = parts[magic:]
            # One level (a delimited listing) when only the last component is a glob.
            selector = FileSelector(prefix, recursive=len(rest) > 1 or rest == ["**"])
            try:
                listed = fs.get_file_info(selector)
            except FileNotFoundError:  # no key starts with the prefix; a missing bucket is another error
                listed = []
            infos = [i for i in listed if _glob_match(i.path[len(prefix) + 1:].split("/"), rest)]
        files = [i for i in infos if i.type == FileType.File]
        if not files and fs.get_file_info(bucket).type == FileType.NotFound:
            raise KubeForgeError(f"{pattern}: bucket '{bucket}' does not exist{_at_endpoint()}")
    except OSError as exc:
        raise _store_error(pattern, exc) from None
    return [_source_file(info) for info in files]


def _gone(uri: str) -> bool:
    from pyarrow.fs import FileType

    _, bucket, key = _split(uri)
    try:
        return bool(_s3().get_file_info(f"{bucket}/{key}").type == FileType.NotFound)
    except OSError:
        return False


def _source_file(info: FileInfo) -> SourceFile:
    return SourceFile(f"s3://{info.path}", int(info.size), int(info.mtime_ns or 0))


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether a key's components match a glob's, as `glob.glob(recursive=True)` matches a path's:
    `**` stands for any number of components, and wildcards do not match names starting with a dot."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for i in range(len(parts) + 1):
            if _glob_match(parts[i:], rest):
                return True
            if i < len(parts) and parts[i].startswith("."):
                return False
        return False
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatchcase(parts[0], head) and _glob_match(parts[1:], rest)


def _endpoint() -> str | None:
    return next((os.environ[name] for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None)


def _at_endpoint() -> str:
    endpoint = _endpoint()
    return f" at {endpoint}" if endpoint else ""


def _s3() -> S3FileSystem:
    """This process's S3 client for the current environment (a new one when the variables change)."""
    names = (*_ENDPOINT_VARIABLES, *_CREDENTIAL_VARIABLES, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
             "AWS_DEFAULT_REGION")
    environment = tuple(os.environ.get(name) for name in names)
    return _s3_client(environment, _endpoint(), CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, MAX_ATTEMPTS)


@lru_cache(maxsize=4)
def _s3_client(
    environment: tuple[str | None, ...], endpoint: str | None, connect_s: float, request_s: float, attempts: int
) -> S3FileSystem:
    # `environment` is only the cache key: the AWS SDK reads credentials and region from os.environ.
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    return S3FileSystem(
        endpoint_override=endpoint,
        connect_timeout=connect_s,
        request_timeout=request_s,
        retry_strategy=AwsStandardS3RetryStrategy(max_attempts=attempts),
    )


def _store_error(uri: str, exc: OSError) -> KubeForgeError:
    """One line for an error pyarrow raised from the object store ("... AWS Error <CODE> during <op>
    operation: <message> (Request ID: ...)")."""
    text = str(exc)
    match = _AWS_ERROR.search(text)
    if match is None:
        return KubeForgeError(f"{uri}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}")
    code, operation, message = match.group(1), match.group(2), match.group(3).strip()
    _, bucket, _ = _split(uri)
    if code in _NETWORK_ERRORS:
        curl = _CURL.search(message)
        reason = curl.group(1).strip() if curl else (message or code)
        variable = next((name for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None)
        where = f"the object store at {os.environ[variable]} ({variable})" if variable else (
            "AWS S3 (AWS_ENDPOINT_URL is not set)")
        return KubeForgeError(f"{uri}: cannot reach {where}: {reason} ({MAX_ATTEMPTS} attempts)")
    if code == "NO_SUCH_BUCKET":
        return KubeForgeError(f"{uri}: bucket '{bucket}' does not exist{_at_endpoint()}")
    if not any(os.environ.get(name) for name in _CREDENTIAL_VARIABLES) and not _credentials_file():
        return KubeForgeError(
            f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); "
            f"the object store refused the request without them ({code} during {operation})"
        )
    if code == "INVALID_ACCESS_KEY_ID":
        return KubeForgeError(f"{uri}: access denied: the object store does not know the access key "
                              "(AWS_ACCESS_KEY_ID)")
    if code == "SIGNATURE_DOES_NOT_MATCH":
        return KubeForgeError(f"{uri}: access denied: the secret key does not match the access key "
                              "(AWS_SECRET_ACCESS_KEY)")
    if code in _AUTH_ERRORS:
        return KubeForgeError(
            f"{uri}: access denied ({code} during {operation}): the credentials are wrong or may not "
            f"{'list' if operation.startswith('List') else 'read'} it"
        )
    return KubeForgeError(f"{uri}: {code} during {operation}" + (f": {message}" if message else ""))


def _credentials_file() -> bool:
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    return os.path.isfile(path)
