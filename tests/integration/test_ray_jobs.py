"""jobs/ entrypoints submitted through the Ray Jobs API to a `ray start --head` cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_PRETRAIN, free_port, small_manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ray = str(Path(sys.executable).with_name("ray"))
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray-head")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def submit_and_wait(address: str, entrypoint: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        # The repository travels as the job's working directory, as in the entrypoints' docstrings.
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".kubeforge", ".git", "*.egg-info"]},
    )
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def test_data_then_pretrain_jobs_run_the_stage_functions(ray_head: str, tmp_path: Path) -> None:
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("jobs", pretrain=TINY_PRETRAIN)))
    workdir = tmp_path / "work"
    common = f"--manifest {manifest} --workdir {workdir}"

    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/data.py {common}")
    data = json.loads(logs.strip().splitlines()[-1])
    assert data["stage"] == "data"
    assert (Path(data["directory"]) / "tokenizer" / "tokenizer.json").is_file()

    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/pretrain.py {common}")
    pretrain = json.loads(logs.strip().splitlines()[-1])
    result = json.loads((Path(pretrain["directory"]) / "result.json").read_text())
    assert result["final_step"] == 12
    assert (Path(pretrain["directory"]) / result["model_dir"] / "config.json").is_file()


def test_pretrain_job_before_data_says_what_to_do(tmp_path: Path) -> None:
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("order", pretrain=TINY_PRETRAIN)))
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--manifest", str(manifest), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "needs the 'data' stage of this manifest to have finished" in result.stderr
