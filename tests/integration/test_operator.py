"""The operator (kopf, our handlers) running in-process against kmock's fake Kubernetes API server.

kmock's KubernetesEmulator stores what it is sent and streams watch events, so the operator is
exercised at the HTTP boundary exactly as against a cluster: discovery, watches, creates, merge
patches of the status subresource, finalizers. Nothing plays KubeRay: the tests write RayJob
statuses the way KubeRay would.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kubeforge_operator import handlers, metrics
from kubeforge_operator.config import FINALIZER, OperatorConfig
from kubeforge_operator.owner import Owner
from kubeforge_operator.pipeline import manifest_document, validate
from kubeforge_operator.rayjob import rayjob_name, report_tag, stage_rayjob
from tests.kopf_harness import eventually, get, send, serve_resources

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
NS = "team-a"
PIPELINES = f"/apis/kubeforge.io/v1alpha1/namespaces/{NS}/modelpipelines"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"
CONFIG = OperatorConfig(stage_image="ghcr.io/kubeforge/kubeforge-train:0.1.0",
                        quantize_image="ghcr.io/kubeforge/kubeforge-quantize:0.1.0",
                        namespaces=(NS,))
assert handlers.pipeline_changed  # importing the module registered the handlers

# kopf asks its login handlers where the API server is; this one answers with the current kmock.
_server: list[str] = []


@kopf.on.login()
def _login_to_kmock(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_server[-1])


def pipeline_body(name: str = "quickstart", **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    # kmock keeps what it is sent: the server-set fields kopf relies on are set here (kopf tests
    # resourceVersion in its JSON patches; kmock never changes it, so that test always holds).
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"}
    doc["spec"]["cluster"] = {"workdir_claim": "kubeforge-work", "retries": 1, "retry_delay_s": 1}
    doc["spec"].update(spec)
    return doc


@contextlib.asynccontextmanager
async def operator(config: OperatorConfig = CONFIG) -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as api, kmock.Server(api):
        serve_resources(api)
        _server.append(str(api.url))
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True  # the namespace is named; no namespace listing to follow
        stop = asyncio.Event()
        task = asyncio.create_task(kopf.operator(
            registry=kopf.get_default_registry(), settings=settings, standalone=True, namespaces=[NS],
            stop_flag=stop, memo=kopf.Memo(config=config),
        ))
        try:
            yield api
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)
            _server.pop()


def job_name(stage: str, attempt: int, body: dict[str, Any] | None = None) -> str:
    """The name of `stage`'s `attempt`-th RayJob for the spec of `body` (the quickstart's by default)."""
    body = body or pipeline_body()
    keys = validate(manifest_document(body)).stage_keys()
    return rayjob_name(body["metadata"]["name"], stage, keys[stage], attempt)


async def rayjob_names(api: kmock.KubernetesEmulator) -> list[str]:
    listing = await get(api, RAYJOBS)
    return sorted(item["metadata"]["name"] for item in (listing or {}).get("items", []))


async def finish(api: kmock.KubernetesEmulator, name: str, job_status: str, message: str = "") -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {"jobStatus": job_status, "jobDeploymentStatus": "Complete" if job_status == "SUCCEEDED" else "Failed",
              "endTime": now, "message": message}
    await send(api, "PATCH", f"{RAYJOBS}/{name}/status", {"status": status})


def stage(status: dict[str, Any] | None, name: str) -> dict[str, Any]:
    return ((status or {}).get("stages") or {}).get(name) or {}


async def pipeline_status(api: kmock.KubernetesEmulator, name: str = "quickstart") -> dict[str, Any]:
    return ((await get(api, f"{PIPELINES}/{name}")) or {}).get("status") or {}


async def test_stages_run_in_order_retry_fail_and_are_cleaned_up() -> None:
    ok_before = metrics.RECONCILES.labels("ModelPipeline", "ok")._value.get()
    async with operator() as api:
        await send(api, "POST", PIPELINES, pipeline_body())

        # The data stage's RayJob and the manifest ConfigMap appear.
        await eventually(lambda: rayjob_names(api), "the data stage's RayJob")
        assert await rayjob_names(api) == [job_name("data", 1)]
        job = await get(api, f"{RAYJOBS}/{job_name('data', 1)}")
        expected = stage_rayjob(validate(manifest_document(pipeline_body())), "data",
                                Owner("quickstart", NS, "uid-quickstart"), CONFIG, generation=1)
        assert job["spec"] == expected["spec"] and job["metadata"]["labels"] == expected["metadata"]["labels"]
        assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-quickstart"
        configmap = await get(api, f"{CONFIGMAPS}/quickstart-manifest")
        manifest = yaml.safe_load(configmap["data"]["manifest.yaml"])
        assert manifest["spec"] == pipeline_body()["spec"]
        assert manifest["metadata"] == {"name": "quickstart", "namespace": NS}
        status = await eventually(lambda: pipeline_status(api), "a status")
        assert status["phase"] == "Running" and stage(status, "data")["rayJob"] == job_name("data", 1)
        body = await get(api, f"{PIPELINES}/quickstart")
        assert FINALIZER in body["metadata"]["finalizers"]
        assert "kopf" not in body["status"]  # kopf's bookkeeping stays in annotations

        # Data succeeds: the pretrain stage starts and the status says so.
        await finish(api, job_name("data", 1), "SUCCEEDED")
        await eventually(lambda: _has(api, job_name("pretrain", 1)), "the pretrain RayJob")
        status = await eventually(
            lambda: _where(pipeline_status(api), lambda s: stage(s, "pretrain").get("rayJob")), "pretrain in status")
        assert stage(status, "data")["phase"] == "Succeeded"
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions["DataSucceeded"] == "True" and conditions["Valid"] == "True"
        assert status["currentStage"] == "pretrain"

        # Pretrain fails: after retry_delay_s a second attempt; when that fails too, the pipeline fails.
        await finish(api, job_name("pretrain", 1), "FAILED", "worker OOMKilled")
        await eventually(lambda: _has(api, job_name("pretrain", 2)), "the retry of pretrain", timeout=20)
        status = await pipeline_status(api)
        assert stage(status, "pretrain")["attempts"] == 2
        await finish(api, job_name("pretrain", 2), "FAILED", "worker OOMKilled")
        status = await eventually(lambda: _where(pipeline_status(api), lambda s: s.get("phase") == "Failed"),
                                  "phase Failed")
        assert stage(status, "pretrain")["phase"] == "Failed"
        assert "no retries left" in stage(status, "pretrain")["message"]
        assert stage(status, "finetune")["phase"] == "Skipped"
        await asyncio.sleep(1.5)  # a third attempt would have been created by now
        assert await rayjob_names(api) == sorted([job_name("data", 1), job_name("pretrain", 1), job_name("pretrain", 2)])

        # Delete: the finalizer removes the RayJobs and the ConfigMap, then lets the pipeline go.
        await send(api, "DELETE", f"{PIPELINES}/quickstart")
        await eventually(lambda: _gone(api, f"{PIPELINES}/quickstart"), "the pipeline to be gone")
        assert await rayjob_names(api) == []
        assert await get(api, f"{CONFIGMAPS}/quickstart-manifest") is None
    assert metrics.RECONCILES.labels("ModelPipeline", "ok")._value.get() > ok_before


async def test_an_invalid_spec_gets_a_condition_and_no_children() -> None:
    bad = pipeline_body("broken")
    bad["spec"]["pretrain"]["train"]["lr"] = -1
    del bad["spec"]["cluster"]
    async with operator() as api:
        await send(api, "POST", PIPELINES, bad)
        status = await eventually(lambda: pipeline_status(api, "broken"), "the Invalid status")
        assert status["phase"] == "Invalid"
        (valid,) = status["conditions"]
        assert valid["type"] == "Valid" and valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert "spec.pretrain.train.lr: must be > 0 (got -1)" in valid["message"]
        await asyncio.sleep(0.5)
        assert await rayjob_names(api) == []
        assert await get(api, f"{CONFIGMAPS}/broken-manifest") is None

        # Fixing the spec lets it run.
        fixed = copy.deepcopy(pipeline_body("broken")["spec"])
        await send(api, "PATCH", f"{PIPELINES}/broken", {"spec": fixed})
        await eventually(lambda: _has(api, job_name("data", 1, pipeline_body("broken"))), "the data RayJob after the fix")


async def test_a_retry_that_succeeds_leaves_nothing_of_the_failed_attempt() -> None:
    async with operator() as api:
        await send(api, "POST", PIPELINES, pipeline_body())
        await eventually(lambda: _has(api, job_name("data", 1)), "the data RayJob")
        await finish(api, job_name("data", 1), "FAILED", "worker OOMKilled")
        status = await eventually(lambda: _where(pipeline_status(api), lambda s: "OOMKilled" in stage(s, "data").get(
            "message", "")), "the failure in the status")
        assert stage(status, "data")["completionTime"]

        await eventually(lambda: _has(api, job_name("data", 2)), "the retry", timeout=20)
        running = await eventually(lambda: _where(pipeline_status(api), lambda s: stage(s, "data").get(
            "rayJob") == job_name("data", 2)), "the retry in the status")
        assert "message" not in stage(running, "data") and "completionTime" not in stage(running, "data")

        await finish(api, job_name("data", 2), "SUCCEEDED")
        done = await eventually(lambda: _where(pipeline_status(api), lambda s: stage(s, "data").get(
            "phase") == "Succeeded"), "data succeeded")
        assert "message" not in stage(done, "data") and stage(done, "data")["attempts"] == 2
        assert done["conditions"][2] == {**done["conditions"][2], "type": "Failed", "status": "False",
                                         "message": "no stage failed"}


async def test_an_edit_reruns_exactly_the_stages_it_changes() -> None:
    original = pipeline_body()
    async with operator() as api:
        await send(api, "POST", PIPELINES, original)
        for name in validate(manifest_document(original)).stage_names():
            await eventually(lambda: _has(api, job_name(name, 1)), f"the {name} RayJob")  # noqa: B023
            await finish(api, job_name(name, 1), "SUCCEEDED")
        await eventually(lambda: _where(pipeline_status(api), lambda s: s.get("phase") == "Succeeded"), "Succeeded")

        # A late section: evaluate and promote (which reads it) run again, nothing else.
        late = copy.deepcopy(original)
        late["spec"]["evaluate"]["max_new_tokens"] = 17
        late["metadata"]["generation"] = 2
        await send(api, "PATCH", f"{PIPELINES}/quickstart", {"metadata": {"generation": 2}, "spec": late["spec"]})
        await eventually(lambda: _has(api, job_name("evaluate", 1, late)), "the edited evaluate stage's RayJob")
        status = await eventually(lambda: _where(pipeline_status(api), lambda s: s.get("observedGeneration") == 2),
                                  "the edit observed")
        assert status["phase"] == "Running" and stage(status, "evaluate")["generation"] == 2
        assert stage(status, "quantize")["generation"] == 1 and stage(status, "quantize")["phase"] == "Succeeded"
        configmap = await get(api, f"{CONFIGMAPS}/quickstart-manifest")
        assert yaml.safe_load(configmap["data"]["manifest.yaml"])["spec"]["evaluate"]["max_new_tokens"] == 17

        # An early section while evaluate runs: the evaluate RayJob is stopped, pretrain and the rest rerun.
        early = copy.deepcopy(late)
        early["spec"]["pretrain"]["train"]["lr"] = 1.0e-3
        await send(api, "PATCH", f"{PIPELINES}/quickstart", {"metadata": {"generation": 3}, "spec": early["spec"]})
        await eventually(lambda: _has(api, job_name("pretrain", 1, early)), "the edited pretrain stage's RayJob")
        await eventually(lambda: _gone(api, f"{RAYJOBS}/{job_name('evaluate', 1, late)}"), "the stale evaluate gone")
        names = await rayjob_names(api)
        assert job_name("data", 1) in names and job_name("data", 1, early) == job_name("data", 1)
        assert [n for n in names if "-evaluate-" in n] == [job_name("evaluate", 1)]  # the first, finished one
        await finish(api, job_name("pretrain", 1, early), "SUCCEEDED")
        await eventually(lambda: _has(api, job_name("finetune", 1, early)), "finetune after the edited pretrain")


def stage_run(client: MlflowClient, experiment_id: str, rayjob: str, owner_uid: str) -> str:
    """A finished MLflow run tagged as a stage job tags it (`jobs/stage.py --report-tag`)."""
    run = client.create_run(experiment_id, tags={report_tag(rayjob): owner_uid})
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


async def test_the_status_names_each_stage_run_and_the_registered_version(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("quickstart")
    data_run = stage_run(client, experiment, job_name("data", 1), "uid-quickstart")
    pretrain_run = stage_run(client, experiment, job_name("pretrain", 1), "uid-quickstart")
    # A run of an earlier pipeline of the same name (another uid) is not this pipeline's.
    stage_run(client, experiment, job_name("finetune", 1), "uid-of-a-deleted-pipeline")
    client.create_registered_model("quickstart")
    client.create_model_version("quickstart", f"runs:/{pretrain_run}/model", run_id=pretrain_run)

    async with operator(dataclasses.replace(CONFIG, mlflow_tracking_uri=tracking_uri)) as api:
        await send(api, "POST", PIPELINES, pipeline_body())
        await eventually(lambda: _has(api, job_name("data", 1)), "the data RayJob")
        await finish(api, job_name("data", 1), "SUCCEEDED")
        status = await eventually(lambda: _where(pipeline_status(api), lambda s: stage(s, "data").get("mlflowRunId")),
                                  "the data stage's run in the status")
        assert stage(status, "data")["mlflowRunId"] == data_run and "modelVersion" not in status

        await eventually(lambda: _has(api, job_name("pretrain", 1)), "the pretrain RayJob")
        await finish(api, job_name("pretrain", 1), "SUCCEEDED")
        status = await eventually(lambda: _where(pipeline_status(api), lambda s: s.get("modelVersion")),
                                  "the registered version in the status")
        assert stage(status, "pretrain") | {"mlflowRunId": pretrain_run, "modelVersion": "1"} == stage(status, "pretrain")
        assert status["modelVersion"] == "1" and stage(status, "data")["mlflowRunId"] == data_run

        await eventually(lambda: _has(api, job_name("finetune", 1)), "the finetune RayJob")
        await finish(api, job_name("finetune", 1), "SUCCEEDED")
        status = await eventually(
            lambda: _where(pipeline_status(api), lambda s: stage(s, "finetune").get("phase") == "Succeeded"),
            "finetune succeeded")
        assert "mlflowRunId" not in stage(status, "finetune")


async def _has(api: kmock.KubernetesEmulator, name: str) -> bool:
    return name in await rayjob_names(api)


async def _gone(api: kmock.KubernetesEmulator, url: str) -> bool:
    return await get(api, url) is None


async def _where(status: Any, predicate: Callable[[dict[str, Any]], Any]) -> dict[str, Any] | None:
    value = await status
    return value if predicate(value) else None
