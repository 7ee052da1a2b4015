"""Listing and opening object-store sources (`s3://`) on moto's S3 server, and every way that fails.

Each failure must be one line naming the URI; `tests/s3_fixtures.py` starts the server with IAM
authentication on, so wrong keys and missing permissions fail as they would on S3 or MinIO.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeforge import filesystems
from kubeforge.errors import KubeForgeError
from kubeforge.filesystems import check_uri, is_uri, list_files, open_input
from tests.helpers import free_port
from tests.s3_fixtures import ObjectStore

pytestmark = pytest.mark.unit

TREE = {
    "corpus/b.jsonl": '{"text": "bee"}\n',
    "corpus/a.jsonl": '{"text": "a"}\n',
    "corpus/notes.txt": "plain text\n",
    "corpus/.hidden.jsonl": '{"text": "hidden"}\n',
    "corpus/sub/c.jsonl": '{"text": "sea"}\n' * 3,
    "corpus/sub/deeper/d.jsonl": '{"text": "d"}\n',
    "corpus/.cache/e.jsonl": '{"text": "e"}\n',
    "other/x.jsonl": '{"text": "x"}\n',
}


@pytest.fixture
def bucket(s3_env: ObjectStore) -> str:
    return s3_env.new_bucket(TREE)


def _names(found: list[filesystems.SourceFile], root: str) -> list[str]:
    return [f.path.removeprefix(root) for f in found]


@pytest.mark.parametrize("pattern", [
    "corpus/*.jsonl", "corpus/?.jsonl", "corpus/**/*.jsonl", "corpus/**", "**/*.jsonl", "*/*.txt",
    "corpus/sub/*", "corpus/[ab].jsonl", "corpus/*/*.jsonl", "corpus/a.jsonl", "corpus/.hidden.jsonl",
    "corpus/.*", "corpus/sub", "corpus/none/*.jsonl", "corpus/missing.jsonl",
])
def test_a_glob_matches_the_same_keys_as_the_same_local_glob(pattern: str, bucket: str, tmp_path: Path) -> None:
    for key, content in TREE.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text(content)
    local = _names(list_files([pattern], tmp_path), f"{tmp_path}/")
    remote = list_files([f"s3://{bucket}/{pattern}"], tmp_path)
    assert _names(remote, f"s3://{bucket}/") == local
    assert [f.size for f in remote] == [len(TREE[name].encode()) for name in local]


def test_listing_is_sorted_deduplicated_and_carries_sizes_and_times(bucket: str) -> None:
    found = list_files([f"s3://{bucket}/corpus/sub/**", f"s3://{bucket}/corpus/*.jsonl",
                        f"s3://{bucket}/corpus/a.jsonl"], Path("/nowhere"))
    assert [(f.path, f.size) for f in found] == [
        (f"s3://{bucket}/corpus/a.jsonl", 14),
        (f"s3://{bucket}/corpus/b.jsonl", 16),
        (f"s3://{bucket}/corpus/sub/c.jsonl", 48),
        (f"s3://{bucket}/corpus/sub/deeper/d.jsonl", 14),
    ]
    assert all(f.mtime_ns > 1_600_000_000 * 10**9 for f in found)


def test_local_and_object_store_patterns_mix(bucket: str, tmp_path: Path) -> None:
    (tmp_path / "local.txt").write_text("here")
    found = list_files(["local.txt", f"s3://{bucket}/other/*"], tmp_path)
    assert [f.path for f in found] == [str(tmp_path / "local.txt"), f"s3://{bucket}/other/x.jsonl"]


def test_an_object_opens_seekable_and_parquet_reads_from_it(s3_env: ObjectStore) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"]}), buffer)
    bucket = s3_env.new_bucket({"data/t.parquet": buffer.getvalue(), "data/t.txt": "0123456789"})
    with open_input(f"s3://{bucket}/data/t.txt") as file:
        assert file.seekable()
        assert file.read(4) == b"0123"
        file.seek(7)
        assert file.tell() == 7 and file.read() == b"789"
        file.seek(2)
        assert file.read(3) == b"234"
    with open_input(f"s3://{bucket}/data/t.parquet") as file:
        assert pq.ParquetFile(file).read(columns=["text"]).column("text").to_pylist() == ["alpha", "beta", "gamma"]


# --- errors ---------------------------------------------------------------------------------------

def _error(call: object, *args: object) -> str:
    with pytest.raises(KubeForgeError) as info:
        call(*args)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_missing_bucket_is_named(s3_env: ObjectStore) -> None:
    for pattern in ("s3://no-such-bucket/corpus/*.jsonl", "s3://no-such-bucket/corpus/a.jsonl"):
        assert _error(list_files, [pattern], Path(".")) == (
            f"{pattern}: bucket 'no-such-bucket' does not exist at {s3_env.endpoint}"
        )


def test_an_object_that_vanished_after_listing(bucket: str, s3_env: ObjectStore) -> None:
    (found,) = list_files([f"s3://{bucket}/other/*.jsonl"], Path("."))
    s3_env.delete(bucket, "other/x.jsonl")
    assert _error(open_input, found.path) == (
        f"s3://{bucket}/other/x.jsonl: object vanished after it was listed (its key or bucket is gone)"
    )


def test_no_credentials(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    pattern = f"s3://{bucket}/corpus/*.jsonl"
    # S3 answers an unsigned request with AccessDenied; moto's server fails it with an internal error.
    assert re.fullmatch(
        re.escape(f"{pattern}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                  "AWS_PROFILE); the object store refused the request without them (") + r"\w+ during ListObjectsV2\)",
        _error(list_files, [pattern], Path(".")),
    )
    assert _error(open_input, f"s3://{bucket}/corpus/a.jsonl") == (
        f"s3://{bucket}/corpus/a.jsonl: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "or AWS_PROFILE); the object store refused the request without them (ACCESS_DENIED during HeadObject)"
    )


def test_wrong_credentials(bucket: str, monkeypatch: pytest.MonkeyPatch, s3_env: ObjectStore) -> None:
    pattern = f"s3://{bucket}/corpus/*.jsonl"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert _error(list_files, [pattern], Path(".")) == (
        f"{pattern}: access denied: the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)"
    )
    # A HEAD response has no body to say why: the open fails as plainly denied.
    assert _error(open_input, f"s3://{bucket}/corpus/a.jsonl") == (
        f"s3://{bucket}/corpus/a.jsonl: access denied (ACCESS_DENIED during HeadObject): the credentials are wrong "
        "or may not read it"
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    assert _error(list_files, [pattern], Path(".")) == (
        f"{pattern}: access denied: the object store does not know the access key (AWS_ACCESS_KEY_ID)"
    )


def test_credentials_without_permission(bucket: str, monkeypatch: pytest.MonkeyPatch, s3_env: ObjectStore) -> None:
    for name, value in s3_env.env(s3_env.stranger).items():
        monkeypatch.setenv(name, value)
    pattern = f"s3://{bucket}/corpus/*.jsonl"
    assert _error(list_files, [pattern], Path(".")) == (
        f"{pattern}: access denied (ACCESS_DENIED during ListObjectsV2): the credentials are wrong or may not list it"
    )
    assert _error(open_input, f"s3://{bucket}/corpus/a.jsonl") == (
        f"s3://{bucket}/corpus/a.jsonl: access denied (ACCESS_DENIED during HeadObject): the credentials are wrong "
        "or may not read it"
    )


def test_an_endpoint_nobody_listens_on_fails_fast(s3_env: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    started = time.monotonic()
    assert _error(list_files, ["s3://corpus/*.jsonl"], Path(".")) == (
        f"s3://corpus/*.jsonl: cannot reach the object store at {closed} (AWS_ENDPOINT_URL_S3): "
        "Could not connect to server (3 attempts)"
    )
    assert _error(open_input, "s3://corpus/a.jsonl") == (
        f"s3://corpus/a.jsonl: cannot reach the object store at {closed} (AWS_ENDPOINT_URL_S3): "
        "Could not connect to server (3 attempts)"
    )
    assert time.monotonic() - started < 30


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_a_silent_endpoint_times_out_instead_of_hanging(
    s3_env: ObjectStore, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filesystems, "REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(filesystems, "MAX_ATTEMPTS", 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    started = time.monotonic()
    assert _error(list_files, ["s3://corpus/*.jsonl"], Path(".")) == (
        f"s3://corpus/*.jsonl: cannot reach the object store at {silent_endpoint} (AWS_ENDPOINT_URL): "
        "Timeout was reached (2 attempts)"
    )
    assert time.monotonic() - started < 5  # 2 attempts of 1 s each, where the SDK's default would wait 3 s


@pytest.mark.parametrize(("uri", "problem"), [
    ("gs://bucket/corpus/*.jsonl", "unsupported scheme 'gs://' (supported: s3://)"),
    ("s3:///corpus/*.jsonl", "no bucket name (expected s3://bucket/key)"),
    ("s3://corpus-*/a.jsonl", "the bucket name cannot be a glob ('corpus-*'); globs go in the key"),
    ("s3://bucket", "no key: name an object or a glob of keys, e.g. s3://bucket/corpus/*.jsonl"),
    ("s3://bucket/", "no key: name an object or a glob of keys, e.g. s3://bucket/corpus/*.jsonl"),
])
def test_a_malformed_uri_is_refused_without_contacting_a_store(uri: str, problem: str) -> None:
    assert is_uri(uri)
    assert check_uri(uri) == problem
    assert _error(list_files, [uri], Path(".")) == f"{uri}: {problem}"
    assert _error(open_input, uri) == f"{uri}: {problem}"


def test_local_paths_are_not_uris() -> None:
    assert not any(is_uri(p) for p in ("corpus/*.jsonl", "/data/a.txt", "s3:/bucket/a", "./s3://x"))
    assert check_uri("s3://bucket/corpus/**/*.jsonl") is None


def test_an_object_deleted_while_it_is_read(bucket: str, s3_env: ObjectStore) -> None:
    uri = f"s3://{bucket}/corpus/a.jsonl"
    file = open_input(uri)
    s3_env.delete(bucket, "corpus/a.jsonl")
    with pytest.raises(OSError) as info:
        file.read()
    assert str(filesystems.input_error(uri, info.value)) == (
        f"{uri}: object vanished after it was listed (its key or bucket is gone)"
    )
