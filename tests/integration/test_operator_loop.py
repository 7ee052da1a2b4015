"""The retraining loop on Kubernetes: the operator (kopf, our handlers) against kmock's fake API server and a
real SQLite MLflow registry. A drift signal read back from "Prometheus" (injected) starts a turn: the named
ModelPipeline gets a new generation that adds the captured traffic; once it reports Succeeded with a new
`challenger` (registered here, as its promote stage would), the operator pins it as the candidate of its
RayService, the canary promotes it, and the turn is recorded. The guard rails refuse a person's trigger
during the cooldown and remove the annotation; a turn whose new version failed its gates ends with that.

Nothing plays KubeRay or the pipeline's stages: the test reports the RayService ready and writes the
pipeline's status the way they would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kubeforge.registry.client import TAG_GATES, Registry
from kubeforge_operator import loop
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.deployment import Measurements
from tests.helpers import two_version_registry
from tests.integration.test_operator_deployment import (
    DEPLOYMENTS,
    NS,
    RAYSERVICES,
    REPO,
    analyses,
    operator,
    report_ready,
    served,
    status_of,
)
from tests.kopf_harness import eventually, get, send

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(120)]

PIPELINES = f"/apis/kubeforge.io/v1alpha1/namespaces/{NS}/modelpipelines"
CAPTURE = "s3://traffic/loopy"


def pipeline_body(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-p-{name}", "generation": 1, "resourceVersion": "1"}
    doc["spec"]["cluster"] = {"workdir_claim": "kubeforge-work"}
    return doc


def loop_deployment(name: str, cooldown_s: float = 3600.0) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "deployment.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"}
    spec = doc["spec"]
    spec["model"] = f"models:/{name}@champion"
    spec["rollout"]["candidate"] = f"models:/{name}@challenger"
    spec["rollout"]["steps"] = [{"weight": 50, "pause_s": 0}]
    spec["rollout"]["analysis"].update(interval_s=0.2)
    spec["capture"] = {"sample_rate": 1.0, "path": CAPTURE}
    spec["monitor"] = {"thresholds": {"token_js": 0.2}, "retrain": {"pipeline": name, "cooldown_s": cooldown_s}}
    return doc


def retrained(registry: Registry, name: str, gates: str) -> str:
    """What the pipeline's promote stage leaves: a new version with its gates' verdict, `challenger` if it passed."""
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    experiment = client.get_experiment_by_name("rollout-tests").experiment_id
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(Path(registry.tracking_uri.removeprefix("sqlite:///")).parent / "model"), "model")
    version = registry.register(name, run_id=run, artifact_path="model", tags={TAG_GATES: gates}).version
    if gates == "passed":
        registry.promote(name, version, alias="challenger", reason="gates passed", user="test")
    return version


async def test_drift_retrains_through_the_pipeline_and_the_canary_promotes_the_new_version(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path, ["loopy", "gated"])
    config = OperatorConfig(stage_image="s:1", quantize_image="q:1", namespaces=(NS,),
                            mlflow_tracking_uri=registry.tracking_uri, prometheus_url="http://prometheus:9090")
    signals: dict[str, dict[str, float]] = {"loopy": {"token_js": 0.05}, "gated": {"token_js": 0.05}}
    asked: list[str] = []

    def read_signals(model: Any, namespace: str, prometheus: str) -> dict[str, float]:
        asked.append(prometheus)
        return signals[model.metadata.name]

    measurements = Measurements(measure=analyses({"loopy": "pass", "gated": "pass"}).measure, signals=read_signals)
    async with operator(config, measurements) as api:
        await send(api, "POST", PIPELINES, pipeline_body("loopy"))
        await send(api, "POST", DEPLOYMENTS, loop_deployment("loopy"))
        service = await eventually(lambda: get(api, f"{RAYSERVICES}/loopy"), "the RayService")
        # The champion serves alone (no turn pinned a candidate), with the monitor's replica reading its traffic.
        assert served(service) == ([("stable", "1")], 0)
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert {"name": "Monitor", "user_config": {"version": "1"}} in app["deployments"]
        assert app["args"]["deployment"]["spec"]["monitor"]["prometheus"] == "http://127.0.0.1:9090"
        await report_ready(api, "loopy")
        await asyncio.sleep(1.0)  # below its threshold: no turn
        assert (await get(api, f"{PIPELINES}/loopy"))["spec"]["data"]["sources"] == [{"type": "python-stdlib"}]

        # The signal crosses its threshold: a turn starts with a new generation of the pipeline.
        signals["loopy"]["token_js"] = 0.4
        body = await eventually(lambda: _edited(api, "loopy"), "the loop's edit of the pipeline")
        assert asked and set(asked) == {"http://127.0.0.1:9090"}
        sources = body["spec"]["data"]["sources"]
        assert sources[0] == {"type": "python-stdlib"}
        assert sources[1]["type"] == "served-traffic" and sources[1]["paths"] == [CAPTURE] and sources[1]["until"] > 0
        assert body["metadata"]["annotations"][loop.ANNOTATION_TURN] == "loopy turn 1"
        running = (await status_of(api, "loopy"))["loop"]["running"]
        assert running["phase"] == "retraining" and running["record"]["trigger"]["kind"] == "drift"
        assert "token_js 0.4" in running["record"]["trigger"]["detail"]
        await asyncio.sleep(0.5)  # the run has not finished: nothing is pinned
        assert served(await get(api, f"{RAYSERVICES}/loopy")) == ([("stable", "1")], 0)

        # The run registered version 3 as challenger: it becomes the candidate, and the canary promotes it.
        assert retrained(registry, "loopy", "passed") == "3"
        await send(api, "PATCH", f"{PIPELINES}/loopy/status",
                   {"status": {"phase": "Succeeded", "observedGeneration": body["metadata"]["generation"]}})

        async def candidate_served() -> bool:
            return served(await get(api, f"{RAYSERVICES}/loopy"))[0] == [("stable", "1"), ("candidate", "3")]

        await eventually(candidate_served, "version 3 as the candidate")
        status = await eventually(lambda: _ended(api, "loopy"), "the turn's end", timeout=30)
        (turn,) = status["loop"]["turns"]
        assert turn["outcome"] == "promoted" and turn["candidate_version"] == "3", turn
        assert (turn["champion_before"], turn["champion_after"]) == ("1", "3")
        assert turn["run_log"] == f"ModelPipeline {NS}/loopy generation {body['metadata']['generation']}"
        assert "running" not in status["loop"] and status["servedVersion"] == "3"
        assert Registry(registry.tracking_uri).alias("loopy", "champion").version == "3"
        service = await get(api, f"{RAYSERVICES}/loopy")
        assert served(service) == ([("stable", "1"), ("candidate", "3")], 100)
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert {"name": "Monitor", "user_config": {"version": "3"}} in app["deployments"]

        # A person asks for another turn during the cooldown: refused, recorded, the annotation removed.
        await send(api, "PATCH", f"{DEPLOYMENTS}/loopy",
                   {"metadata": {"annotations": {loop.ANNOTATION_TRIGGER: "new data arrived"}}})

        async def refused() -> dict[str, Any] | None:
            status = await status_of(api, "loopy")
            return status if (status.get("loop") or {}).get("refused") else None

        status = await eventually(refused, "the refusal")
        assert status["loop"]["refused"]["trigger"] == "manual" and "cooldown" in status["loop"]["refused"]["reason"]
        body = await get(api, f"{DEPLOYMENTS}/loopy")
        assert loop.ANNOTATION_TRIGGER not in (body["metadata"].get("annotations") or {})
        assert len(status["loop"]["turns"]) == 1

        # Another deployment's retrained version fails its gates: the turn ends so, and nothing is rolled out.
        await send(api, "POST", PIPELINES, pipeline_body("gated"))
        await send(api, "POST", DEPLOYMENTS, loop_deployment("gated"))
        await eventually(lambda: get(api, f"{RAYSERVICES}/gated"), "the second RayService")
        await send(api, "PATCH", f"{DEPLOYMENTS}/gated",
                   {"metadata": {"annotations": {loop.ANNOTATION_TRIGGER: "try it"}}})
        body = await eventually(lambda: _edited(api, "gated"), "the loop's edit of the second pipeline")
        assert retrained(registry, "gated", "failed") == "3"
        await send(api, "PATCH", f"{PIPELINES}/gated/status",
                   {"status": {"phase": "Failed", "observedGeneration": body["metadata"]["generation"]}})
        status = await eventually(lambda: _ended(api, "gated"), "the second turn's end", timeout=30)
        (turn,) = status["loop"]["turns"]
        assert turn["outcome"] == "gates_failed" and turn["candidate_version"] == "3"
        assert turn["trigger"]["kind"] == "manual" and "try it" in turn["trigger"]["detail"]
        assert served(await get(api, f"{RAYSERVICES}/gated")) == ([("stable", "1")], 0)
        assert Registry(registry.tracking_uri).alias("gated", "champion").version == "1"


async def _edited(api: Any, name: str) -> dict[str, Any] | None:
    body = await get(api, f"{PIPELINES}/{name}")
    return body if loop.ANNOTATION_TURN in ((body or {}).get("metadata") or {}).get("annotations", {}) else None


async def _ended(api: Any, name: str) -> dict[str, Any] | None:
    status = await status_of(api, name)
    return status if (status.get("loop") or {}).get("turns") else None
