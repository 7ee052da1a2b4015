"""MLflow server mode: a real `mlflow server` backed by PostgreSQL (Debian's package)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from kubeforge.executor import RunOptions, run_pipeline
from kubeforge.progress import LineReporter
from kubeforge.spec.load import parse_manifest
from kubeforge.workdir import Workdir
from tests.helpers import free_port, small_manifest, stop_process_group

pytestmark = pytest.mark.integration


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root, developers usually do not.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL server binaries missing: `make test` installs Debian's postgresql package")
    bindir = Path(bins[-1])
    # Not under pytest's tmp_path: that is private to the current user and postgres could not enter it.
    root = Path(tempfile.mkdtemp(prefix="kubeforge-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "kubeforge", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kubeforge", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://kubeforge@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115 - closed in finally
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            postgres_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn workers are stopped with it, as one process group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer /health within 300 s")
        yield url
    finally:
        stop_process_group(server, signal.SIGTERM, grace_s=10)
        log.close()


def test_stage_runs_params_dataset_and_artifacts_land_in_the_server(
    ray_local, mlflow_server: str, tmp_path: Path
) -> None:
    pipeline = parse_manifest(small_manifest("server-mode"))
    options = RunOptions(workdir=Workdir(tmp_path / "work"), base_dir=tmp_path, tracking_uri=mlflow_server)
    record = run_pipeline(pipeline, options, LineReporter())
    assert record.tracking_uri == mlflow_server
    assert not (tmp_path / "work" / "mlflow.db").exists(), "nothing may fall back to the embedded store"

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("server-mode")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == record.stage("data").mlflow_run_id
    assert run.data.params["data.tokenizer.vocab_size"] == "512"
    assert run.data.tags["kubeforge.pipeline"] == "server-mode"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == run.data.tags["kubeforge.dataset_hash"][: len(dataset_input.dataset.digest)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/card.json", "data/funnel.png", "data/tokenizer"} <= artifacts
