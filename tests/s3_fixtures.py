"""An S3-compatible object store for the tests: moto's standalone server on a free localhost port.

It runs as its own process (`moto_server`), reachable over HTTP, so that everything that reads from it
— this process, a `kubeforge run` subprocess and its Ray workers — only needs the environment
variables of `ObjectStore.env()`. The server checks signatures and permissions (moto's IAM
authentication, switched on once two users exist): `reader` may do anything in S3, `stranger` has
valid keys and no permission at all. Buckets are never reused between tests: `new_bucket` names each.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

REGION = "us-east-1"


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str


@dataclass
class ObjectStore:
    endpoint: str
    reader: Keys
    """Allowed every S3 action."""
    stranger: Keys
    """Known to the server, allowed nothing."""
    _names: Iterator[int] = field(default_factory=itertools.count)

    def env(self, keys: Keys | None = None) -> dict[str, str]:
        """The variables under which KubeForge reads from this store (as `keys`, by default `reader`)."""
        keys = keys or self.reader
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": keys.access_key,
            "AWS_SECRET_ACCESS_KEY": keys.secret_key,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.reader.access_key, aws_secret_access_key=self.reader.secret_key)

    def new_bucket(self, files: Mapping[str, bytes | str] | None = None) -> str:
        """A new, empty bucket holding `files` ({key: content})."""
        name = f"bucket-{next(self._names)}"
        self.client().create_bucket(Bucket=name)
        self.upload(name, files or {})
        return name

    def upload(self, bucket: str, files: Mapping[str, bytes | str]) -> None:
        client = self.client()
        for key, content in files.items():
            client.put_object(Bucket=bucket, Key=key, Body=content.encode() if isinstance(content, str) else content)

    def upload_dir(self, bucket: str, folder: Path, prefix: str = "") -> None:
        """Every file under `folder`, at `prefix` + its path relative to `folder`."""
        self.upload(bucket, {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                             for p in sorted(folder.rglob("*")) if p.is_file()})

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)


# Every AWS variable the SDK would otherwise read from the test session's environment.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def isolated_aws_env(tmp: Path, variables: Mapping[str, str]) -> dict[str, str]:
    """`variables` over an environment without any other AWS setting: no credentials file, profile or
    instance metadata service the SDK could fall back on."""
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **variables,
    }


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """moto's S3 server for the session, with IAM authentication on."""
    import boto3
    import requests

    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("moto_server missing: the test extra installs moto[server]")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"moto_server exited at start: {log.read_text()[-2000:]}"
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "moto_server was not ready within 60 s"
            time.sleep(0.2)
        # Users are created while the server still accepts anything; then every request must be signed
        # by a known key and allowed by its user's policy.
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        keys = {}
        for user in ("reader", "stranger"):
            iam.create_user(UserName=user)
            created = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = Keys(created["AccessKeyId"], created["SecretAccessKey"])
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield ObjectStore(endpoint, keys["reader"], keys["stranger"])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_env(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ObjectStore:
    """This process's environment set to read from `object_store` as `reader`; restored after the test."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in isolated_aws_env(tmp_path, object_store.env()).items():
        monkeypatch.setenv(name, value)
    return object_store
