"""The jobs/ entrypoint submitted through the Ray Jobs API to a `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from kubeforge.runtime import LOCAL_RUNTIME_ENV
from kubeforge.stages import all_stages
from kubeforge.workdir import Workdir
from kubeforge_operator.rayjob import StageRun, report_tag
from kubeforge_operator.stage_runs import find_stage_runs
from tests.helpers import TINY_PRETRAIN, free_port, small_manifest, stop_process_group

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A separate head node, as `ray start --head` on a cluster would run it.

    It runs with --block in a process group of its own and is stopped by killing that group:
    `ray stop` would also stop every other Ray runtime of this user, the test session's included.
    """
    ray = str(Path(sys.executable).with_name("ray"))
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray-head")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
         # The agent's default port (52365) is taken when another Ray runtime runs on this machine,
         # such as the test session's own: the head would then never accept a job.
         f"--dashboard-agent-listen-port={agent_port}",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # Ray turns token auth on by itself when ~/.ray/auth_token exists; pin it off so that the
        # head and this test's JobSubmissionClient agree on every machine. Its workers at the niceness
        # of this process, as in the runtimes KubeForge starts (kubeforge.runtime.LOCAL_RUNTIME_ENV).
        env={**os.environ, **LOCAL_RUNTIME_ENV, "RAY_AUTH_MODE": "disabled"},
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard did not come up within 180 s"
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield address
    finally:
        # A throwaway head: SIGKILL to the group takes GCS, raylet, dashboard and workers down at once
        # (`ray start --block` answers SIGTERM only after a long grace period).
        stop_process_group(head)


def submit_and_wait(address: str, entrypoint: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 180
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                # The repository travels as the job's working directory, as in the entrypoints' docstrings.
                runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".kubeforge", ".git", "*.egg-info"]},
            )
            break
        except RuntimeError as exc:
            # A fresh head accepts jobs only once its node's dashboard agent has registered, which
            # takes a while on a loaded machine; Ray says "No available agent ... try again later".
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def result_line(logs: str) -> dict:
    """The entrypoint's JSON result: its last stdout line (Ray may log more lines after it)."""
    for line in reversed(logs.splitlines()):
        if line.startswith('{"stage"'):
            return dict(json.loads(line))
    raise AssertionError(f"no result line in the job's logs:\n{logs[-3000:]}")


def test_data_then_pretrain_jobs_run_the_stage_functions(ray_head: str, tmp_path: Path) -> None:
    manifest = tmp_path / "pipeline.yaml"
    # One worker: this test is about the job entrypoints, and every worker costs a torch import.
    manifest.write_text(yaml.safe_dump(small_manifest("jobs", pretrain={**TINY_PRETRAIN, "resources": {"workers": 1}})))
    workdir = tmp_path / "work"
    common = f"--manifest {manifest} --workdir {workdir}"

    # --report-tag as the operator sets it, for a RayJob of a pipeline whose uid is "uid-1".
    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/stage.py data {common} "
                                     f"--report-tag {report_tag('jobs-data-1')}=uid-1")
    data = result_line(logs)
    assert data["stage"] == "data"
    assert (Path(data["directory"]) / "tokenizer" / "tokenizer.json").is_file()

    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/stage.py pretrain {common} "
                                     f"--report-tag {report_tag('jobs-pretrain-1')}=uid-1")
    pretrain = result_line(logs)
    result = json.loads((Path(pretrain["directory"]) / "result.json").read_text())
    assert result["final_step"] == 12
    assert (Path(pretrain["directory"]) / result["model_dir"] / "config.json").is_file()
    # A job's log holds its workers' output, as always; the stage's folder keeps a copy (kubeforge.logs).
    assert "(RayTrainWorker pid=" in logs
    assert "(RayTrainWorker pid=" in (Path(pretrain["directory"]) / "logs" / "ray.log").read_text()

    # A second attempt of the data stage reuses the first one's output, and tags its run.
    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/stage.py data {common} "
                                     f"--report-tag {report_tag('jobs-data-2')}=uid-1")
    assert result_line(logs)["mlflow_run_id"] == data["mlflow_run_id"]

    # What the operator reads back: each RayJob's run, and the version pretrain registered.
    tracking_uri = f"sqlite:///{Workdir(workdir).mlflow_db}"
    wanted = {"data": "jobs-data-2", "pretrain": "jobs-pretrain-1"}
    assert find_stage_runs(tracking_uri, "jobs", "uid-1", wanted) == {
        "data": StageRun(data["mlflow_run_id"]),
        "pretrain": StageRun(pretrain["mlflow_run_id"], result["registered"]["version"]),
    }
    # The same RayJob names under a pipeline created again (another uid) are not confused with these.
    assert find_stage_runs(tracking_uri, "jobs", "uid-2", wanted) == {}


def test_pretrain_job_before_data_says_what_to_do(tmp_path: Path) -> None:
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("order", pretrain=TINY_PRETRAIN)))
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "stage.py"), "pretrain", "--manifest", str(manifest), "--workdir",
         str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "needs the 'data' stage of this manifest to have finished" in result.stderr


def test_the_job_entrypoint_names_the_stages_it_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "stage.py"), "pretrian", "--manifest", "m.yaml", "--workdir",
         str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    names = ", ".join(repr(stage.name) for stage in all_stages())  # the registry's, in its order
    assert f"invalid choice: 'pretrian' (choose from {names})" in result.stderr
