"""ModelDeployments through the operator (kopf, our handlers) against kmock's fake Kubernetes API
server and a real SQLite MLflow registry: a canary driven to promotion and to rollback by injected
analyses, the RayService's router weight patched in place, both variants kept at the final weight once
the rollout ends, an A/B test decided by an injected comparison, bearer auth from a Secret, and invalid
specs refused.

Nothing plays KubeRay: the tests report the RayService ready the way KubeRay would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml
from kopf._core.intents.causes import Activity  # kopf is pinned to one version (pyproject)

from kubeforge.registry.client import TAG_LORA_ADAPTER, TAG_PARENT_VERSION, Registry
from kubeforge.rollout import decision
from kubeforge.rollout.controller import Subject
from kubeforge.rollout.stats import ABComparison, compare_error_rates
from kubeforge.spec.deployment import ABRollout, CanaryRollout
from kubeforge_operator import handlers
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.deployment import ANNOTATION_ABORT, MEMO_KEY, Measurements
from kubeforge_operator.rayservice import SERVE_TOKEN_ENV, serve_weight
from tests.helpers import two_version_registry
from tests.kopf_harness import eventually, get, send, serve_resources

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
NS = "team-a"
DEPLOYMENTS = f"/apis/kubeforge.io/v1alpha1/namespaces/{NS}/modeldeployments"
RAYSERVICES = f"/apis/ray.io/v1/namespaces/{NS}/rayservices"
RAYSERVICE = "ray.io/v1/rayservices"
"""The resource as kmock's object store names it (`api.objects[RAYSERVICE, NS, name]`)."""
assert handlers.deployment_changed  # importing the module registered the handlers

_server: list[str] = []


def _login_to_kmock(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_server[-1])


def operator_registry() -> kopf.OperatorRegistry:
    """The operator's handlers (what importing `handlers` put in kopf's default registry) with this
    module's login handler instead of any other: kopf retries every failing login handler before it
    connects, and other test modules register ones that answer only while their own servers run."""
    registry = kopf.OperatorRegistry()
    default = kopf.get_default_registry()
    for part in ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks"):
        for handler in getattr(default, part).get_all_handlers():
            if getattr(handler, "activity", None) != Activity.AUTHENTICATION:
                getattr(registry, part).append(handler)
    kopf.on.login(registry=registry)(_login_to_kmock)
    return registry

def analyses(outcome: dict[str, str]) -> Measurements:
    """Every check of the analysis at a value that passes or fails it, by deployment name."""

    def measure(policy: CanaryRollout, subject: Subject) -> Sequence[decision.CheckResult]:
        value = 0.0 if outcome[subject.deployment] == "pass" else 1e9
        return decision.judge(policy.analysis, {n: value for n in decision.check_names(policy.analysis)})

    return Measurements(measure=measure)


def comparisons(winner: dict[str, str]) -> Measurements:
    """An A/B comparison of 5xx shares that the named variant wins clearly, by deployment name."""

    def compare(policy: ABRollout, subject: Subject, end: float) -> ABComparison:
        good, bad = (0.0, 200.0)
        errors = {"candidate": good, "stable": bad} if winner[subject.deployment] == "candidate" else {
            "candidate": bad, "stable": good}
        return compare_error_rates(errors["candidate"], 1000.0, errors["stable"], 1000.0, alpha=policy.alpha,
                                   min_samples=policy.min_samples)

    return Measurements(compare=compare)


def ab_body(name: str, *, promote_winner: bool) -> dict[str, Any]:
    doc = deployment_body(name)
    doc["spec"]["rollout"] = {"strategy": "ab", "candidate": f"models:/{name}/2", "weight": 30, "duration_s": 0.5,
                              "metric": "error_rate", "min_samples": 10, "prometheus": "http://127.0.0.1:9090",
                              "promote_winner": promote_winner}
    return doc


def served(service: dict[str, Any]) -> tuple[list[tuple[str, str]], int | None]:
    """The RayService's variants as (variant, version), and the router's weight."""
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return [(v["variant"], v["version"]) for v in app["args"]["variants"]], serve_weight(service)


async def unchanged_by_another_reconcile(api: kmock.KubernetesEmulator, name: str) -> None:
    """Reconcile the deployment again (an annotation edit is an update to kopf, not a new generation) and
    check that neither its RayService nor its finished rollout moves."""
    service, status = await get(api, f"{RAYSERVICES}/{name}"), await status_of(api, name)
    await send(api, "PATCH", f"{DEPLOYMENTS}/{name}", {"metadata": {"annotations": {"example.com/touched": "1"}}})
    await asyncio.sleep(1.5)
    after = await get(api, f"{RAYSERVICES}/{name}")
    assert after["spec"] == service["spec"] and after["metadata"]["annotations"] == service["metadata"]["annotations"]
    now = await status_of(api, name)
    assert now["rollout"] == status["rollout"] and now["phase"] == status["phase"]


def deployment_body(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "deployment.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"}
    doc["spec"]["model"] = f"models:/{name}@champion"
    rollout = doc["spec"]["rollout"]
    rollout["candidate"] = f"models:/{name}/2"
    rollout["steps"] = [{"weight": 20, "pause_s": 0}, {"weight": 50, "pause_s": 0}]
    rollout["analysis"].update(interval_s=0.2, failure_limit=2)
    doc["spec"].update(spec)
    return doc


@contextlib.asynccontextmanager
async def operator(config: OperatorConfig, measurements: Measurements) -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as api, kmock.Server(api):
        serve_resources(api)
        _server.append(str(api.url))
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        stop = asyncio.Event()
        task = asyncio.create_task(kopf.operator(
            registry=operator_registry(), settings=settings, standalone=True, namespaces=[NS],
            stop_flag=stop, memo=kopf.Memo(config=config, **{MEMO_KEY: measurements}),
        ))
        try:
            yield api
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)
            _server.pop()


async def status_of(api: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    return ((await get(api, f"{DEPLOYMENTS}/{name}")) or {}).get("status") or {}


async def phase_is(api: kmock.KubernetesEmulator, name: str, phase: str) -> dict[str, Any] | None:
    status = await status_of(api, name)
    return status if status.get("phase") == phase else None


async def report_ready(api: kmock.KubernetesEmulator, name: str) -> None:
    condition = {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                 "lastTransitionTime": "2026-01-01T12:00:00Z"}
    await send(api, "PATCH", f"{RAYSERVICES}/{name}/status", {"status": {"conditions": [condition]}})


async def follow_weights(api: kmock.KubernetesEmulator, name: str, until: int) -> list[int]:
    """Every distinct router weight the RayService was written with, in order, once it reaches `until`.

    Read from the fake API server's history of the object, not by polling it: a step's weight lasts only
    until the next analysis, and a poll that comes late (a busy machine) would never see it."""

    async def weight_is_until() -> bool:
        service = await get(api, f"{RAYSERVICES}/{name}")
        return service is not None and serve_weight(service) == until

    await eventually(weight_is_until, f"RayService {name} at weight {until}", timeout=30)
    versions = [None if v is None else v.raw for v in api.objects[RAYSERVICE, NS, name].history]
    assert None not in versions, "the RayService was deleted and created again instead of patched"
    seen: list[int] = []
    for version in versions:
        weight = serve_weight(version)
        if weight is not None and (not seen or seen[-1] != weight):
            seen.append(weight)
    # Patched, not recreated: once KubeRay has written its status, every later version keeps it.
    ready = [bool(v.get("status")) for v in versions]
    later = versions[ready.index(True):] if True in ready else []
    assert later and all(v["status"]["conditions"][0]["type"] == "Ready" for v in later), versions
    return seen


async def test_canaries_promote_and_roll_back_and_invalid_specs_create_nothing(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path, ["good", "bad"])
    config = OperatorConfig(stage_image="ghcr.io/kubeforge/kubeforge-train:0.1.0",
                            quantize_image="ghcr.io/kubeforge/kubeforge-quantize:0.1.0",
                            namespaces=(NS,), mlflow_tracking_uri=registry.tracking_uri)
    async with operator(config, analyses({"good": "pass", "bad": "fail"})) as api:
        # Created: the RayService at the first step's weight, the versions resolved and pinned.
        await send(api, "POST", DEPLOYMENTS, deployment_body("good"))
        service = await eventually(lambda: get(api, f"{RAYSERVICES}/good"), "the RayService")
        assert serve_weight(service) == 20
        assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-good"
        args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
        assert args["variants"] == [{"variant": "stable", "model": "good", "version": "1"},
                                    {"variant": "candidate", "model": "good", "version": "2"}]
        env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "MLFLOW_TRACKING_URI", "value": registry.tracking_uri} in env
        status = await eventually(lambda: phase_is(api, "good", "Deploying"), "phase Deploying")
        assert (status["modelVersion"], status["candidateVersion"], status["weight"]) == ("1", "2", 20)
        assert status["rollout"]["phase"] == "progressing" and status["rayService"] == "good"
        await asyncio.sleep(1.0)  # not ready: no analysis runs, the weight stays
        assert (await status_of(api, "good"))["rollout"]["canary"]["history"] == []

        # KubeRay reports it ready: analyses pass, the weight moves step by step in place, then promotion.
        await report_ready(api, "good")
        assert await follow_weights(api, "good", until=100) == [20, 50, 100]
        status = await eventually(lambda: phase_is(api, "good", "Promoted"), "phase Promoted")
        assert status["weight"] == 100 and status["rollout"]["phase"] == "promoted"
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True" and conditions["Progressing"]["reason"] == "Promoted"
        assert "all steps passed" in conditions["Progressing"]["message"]
        assert Registry(registry.tracking_uri).alias("good", "champion").version == "2"
        tags = Registry(registry.tracking_uri).version("good", "2").tags
        assert tags["kubeforge.rollout"] == "promoted"
        # Champion moved; the pinned versions stay in the status, and the served one is the candidate's.
        assert (status["modelVersion"], status["candidateVersion"], status["servedVersion"]) == ("1", "2", "2")
        assert len((await get(api, RAYSERVICES))["items"]) == 1
        # Both variants keep their replicas (a change of Serve args would restart them all): the candidate
        # takes every request until the spec is edited.
        service = await get(api, f"{RAYSERVICES}/good")
        assert served(service) == ([("stable", "1"), ("candidate", "2")], 100)
        assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2
        await unchanged_by_another_reconcile(api, "good")

        # A failing candidate: weight back to 0, RolledBack with the reason, champion untouched.
        await send(api, "POST", DEPLOYMENTS, deployment_body("bad"))
        await eventually(lambda: get(api, f"{RAYSERVICES}/bad"), "the second RayService")
        await report_ready(api, "bad")
        assert await follow_weights(api, "bad", until=0) == [20, 0]
        status = await eventually(lambda: phase_is(api, "bad", "RolledBack"), "phase RolledBack")
        assert status["weight"] == 0
        progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
        assert progressing["reason"] == "RolledBack" and "2 failed analyses (failure_limit 2)" in progressing["message"]
        assert "error_rate" in progressing["message"]
        assert Registry(registry.tracking_uri).alias("bad", "champion").version == "1"
        assert Registry(registry.tracking_uri).version("bad", "2").tags["kubeforge.rollout"] == "rolled_back"
        assert served(await get(api, f"{RAYSERVICES}/bad")) == ([("stable", "1"), ("candidate", "2")], 0)
        assert status["servedVersion"] == "1"
        await unchanged_by_another_reconcile(api, "bad")

        # An invalid spec: the condition names the field, and no RayService appears.
        broken = deployment_body("broken", replicas=0)
        await send(api, "POST", DEPLOYMENTS, broken)
        status = await eventually(lambda: phase_is(api, "broken", "Invalid"), "phase Invalid")
        (valid,) = status["conditions"]
        assert valid["type"] == "Valid" and valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert "spec.replicas:" in valid["message"]
        await asyncio.sleep(0.5)
        assert await get(api, f"{RAYSERVICES}/broken") is None


async def test_an_abort_annotation_rolls_back_and_is_removed(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path, ["held"])
    config = OperatorConfig(stage_image="s:1", quantize_image="q:1", namespaces=(NS,),
                            mlflow_tracking_uri=registry.tracking_uri)
    async with operator(config, analyses({"held": "pass"})) as api:
        await send(api, "POST", DEPLOYMENTS, deployment_body("held"))
        await eventually(lambda: phase_is(api, "held", "Deploying"), "phase Deploying")
        # Not ready yet, so no analysis has moved it: only the abort can.
        await send(api, "PATCH", f"{DEPLOYMENTS}/held",
                   {"metadata": {"annotations": {ANNOTATION_ABORT: "latency regression"}}})
        status = await eventually(lambda: phase_is(api, "held", "RolledBack"), "phase RolledBack")
        assert status["weight"] == 0 and "aborted: latency regression" in status["rollout"]["reason"]
        service = await get(api, f"{RAYSERVICES}/held")
        assert serve_weight(service) == 0
        body = await eventually(
            lambda: _without_annotation(api, "held"), "the abort annotation to be removed")
        assert ANNOTATION_ABORT not in (body["metadata"].get("annotations") or {})
        assert Registry(registry.tracking_uri).alias("held", "champion").version == "1"


async def _without_annotation(api: kmock.KubernetesEmulator, name: str) -> dict[str, Any] | None:
    body = await get(api, f"{DEPLOYMENTS}/{name}")
    return body if ANNOTATION_ABORT not in (body["metadata"].get("annotations") or {}) else None


async def test_an_ab_test_promotes_its_winner_or_keeps_its_split(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path, ["abwin", "abkeep"])
    config = OperatorConfig(stage_image="s:1", quantize_image="q:1", namespaces=(NS,),
                            mlflow_tracking_uri=registry.tracking_uri)
    async with operator(config, comparisons({"abwin": "candidate", "abkeep": "candidate"})) as api:
        await send(api, "POST", DEPLOYMENTS, ab_body("abwin", promote_winner=True))
        await send(api, "POST", DEPLOYMENTS, ab_body("abkeep", promote_winner=False))
        for name in ("abwin", "abkeep"):
            service = await eventually(lambda n=name: get(api, f"{RAYSERVICES}/{n}"), f"{name}'s RayService")
            assert served(service) == ([("stable", "1"), ("candidate", "2")], 30)
            await report_ready(api, name)

        # promote_winner and a candidate win: champion moves, the candidate takes every request.
        status = await eventually(lambda: phase_is(api, "abwin", "Promoted"), "abwin Promoted")
        assert status["rollout"]["strategy"] == "ab" and status["rollout"]["phase"] == "promoted"
        assert status["rollout"]["ab"]["winner"] == "candidate" and status["weight"] == 100
        assert served(await get(api, f"{RAYSERVICES}/abwin")) == ([("stable", "1"), ("candidate", "2")], 100)
        assert Registry(registry.tracking_uri).alias("abwin", "champion").version == "2"

        # A win without promote_winner concludes: the split stands, both variants keep serving.
        status = await eventually(lambda: _rollout_phase_is(api, "abkeep", "concluded"), "abkeep concluded")
        assert "promote_winner is off" in status["rollout"]["reason"]
        # The settled world. The record is saved as soon as the rollout concludes; the registry is tagged and
        # the rest of the status (its Progressing condition) written only at the end of that reconciliation.
        status = await eventually(lambda: _progressing_reason_is(api, "abkeep", "Concluded"),
                                  "the end of the reconciliation that concluded abkeep")
        assert (status["phase"], status["weight"], status["servedVersion"]) == ("RollingOut", 30, "1")
        assert served(await get(api, f"{RAYSERVICES}/abkeep")) == ([("stable", "1"), ("candidate", "2")], 30)
        assert Registry(registry.tracking_uri).alias("abkeep", "champion").version == "1"
        assert Registry(registry.tracking_uri).version("abkeep", "2").tags["kubeforge.rollout"] == "concluded"
        await unchanged_by_another_reconcile(api, "abkeep")


async def _progressing_reason_is(api: kmock.KubernetesEmulator, name: str, reason: str) -> dict[str, Any] | None:
    status = await status_of(api, name)
    progressing = next((c for c in status.get("conditions") or [] if c["type"] == "Progressing"), {})
    return status if progressing.get("reason") == reason else None


async def _rollout_phase_is(api: kmock.KubernetesEmulator, name: str, phase: str) -> dict[str, Any] | None:
    status = await status_of(api, name)
    return status if (status.get("rollout") or {}).get("phase") == phase else None


async def test_bearer_auth_comes_from_a_secret_and_other_sources_are_refused(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path, ["locked", "envtoken"])
    config = OperatorConfig(stage_image="s:1", quantize_image="q:1", namespaces=(NS,),
                            mlflow_tracking_uri=registry.tracking_uri)
    async with operator(config, analyses({"locked": "pass", "envtoken": "pass"})) as api:
        await send(api, "POST", DEPLOYMENTS,
                   deployment_body("locked", auth={"token_secret": {"name": "serve-token", "key": "token"}}))
        service = await eventually(lambda: get(api, f"{RAYSERVICES}/locked"), "the RayService")
        reference = {"name": SERVE_TOKEN_ENV,
                     "valueFrom": {"secretKeyRef": {"name": "serve-token", "key": "token"}}}
        cluster_config = service["spec"]["rayClusterConfig"]
        for template in (cluster_config["headGroupSpec"]["template"],
                         cluster_config["workerGroupSpecs"][0]["template"]):
            assert reference in template["spec"]["containers"][0]["env"]
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["deployment"]["spec"]["auth"] == {"token_env": SERVE_TOKEN_ENV}

        await send(api, "POST", DEPLOYMENTS, deployment_body("envtoken", auth={"token_env": "SERVE_TOKEN"}))
        status = await eventually(lambda: phase_is(api, "envtoken", "Invalid"), "phase Invalid")
        (valid,) = status["conditions"]
        assert valid["status"] == "False" and "spec.auth.token_env:" in valid["message"]
        assert "use spec.auth.token_secret" in valid["message"]
        await asyncio.sleep(0.5)
        assert await get(api, f"{RAYSERVICES}/envtoken") is None


async def test_a_canary_between_lora_adapters_moves_only_user_config(tmp_path: Path) -> None:
    """Versions 2 and 3 of `adapted` are LoRA adapters over version 1: the RayService serves the base once,
    and the whole canary, promotion included, changes nothing of its args (which would restart replicas)."""
    from mlflow.tracking import MlflowClient

    registry = two_version_registry(tmp_path, ["adapted"])
    client = MlflowClient(registry.tracking_uri)
    run = client.create_run(client.get_experiment_by_name("rollout-tests").experiment_id).info.run_id
    client.log_artifacts(run, str(tmp_path / "model"), "model")
    registry.register("adapted", run_id=run, artifact_path="model", tags={})
    for version in ("2", "3"):
        registry.set_tags("adapted", version, {TAG_PARENT_VERSION: "1", TAG_LORA_ADAPTER: "adapter"})
    registry.promote("adapted", "2", alias="champion", reason="the first adapter", user="test")
    config = OperatorConfig(stage_image="s:1", quantize_image="q:1", namespaces=(NS,),
                            mlflow_tracking_uri=registry.tracking_uri)
    body = deployment_body("adapted", lora={})
    body["spec"]["rollout"]["candidate"] = "models:/adapted/3"
    async with operator(config, analyses({"adapted": "pass"})) as api:
        await send(api, "POST", DEPLOYMENTS, body)
        service = await eventually(lambda: get(api, f"{RAYSERVICES}/adapted"), "the RayService")
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["variants"] == [{"model": "adapted", "version": "1", "variant": "base"}]
        configs = {d["name"]: d["user_config"] for d in app["deployments"]}
        assert configs["Router"]["variants"] == {"stable": {"model": "adapted", "version": "2"},
                                                 "candidate": {"model": "adapted", "version": "3"}}
        assert configs["model-lora"]["adapters"] == {"adapted:stable": "models:/adapted/2",
                                                     "adapted:candidate": "models:/adapted/3"}
        assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 1
        status = await eventually(lambda: phase_is(api, "adapted", "Deploying"), "phase Deploying")
        assert (status["baseVersion"], status["modelVersion"], status["candidateVersion"]) == ("1", "2", "3")

        await report_ready(api, "adapted")
        assert await follow_weights(api, "adapted", until=100) == [20, 50, 100]
        await eventually(lambda: phase_is(api, "adapted", "Promoted"), "phase Promoted")
        assert Registry(registry.tracking_uri).alias("adapted", "champion").version == "3"
        history = [v.raw for v in api.objects[RAYSERVICE, NS, "adapted"].history if v is not None]
        args = {yaml.safe_dump(yaml.safe_load(v["spec"]["serveConfigV2"])["applications"][0]["args"]) for v in history}
        assert len(history) >= 3 and len(args) == 1, args  # every weight, one set of args
        await unchanged_by_another_reconcile(api, "adapted")

        # A version without an adapter cannot be a variant: the status names the field, nothing is served.
        plain = deployment_body("plain", lora={})
        plain["spec"]["model"], plain["spec"]["rollout"]["candidate"] = "models:/adapted/1", "models:/adapted/3"
        await send(api, "POST", DEPLOYMENTS, plain)

        async def refused() -> str | None:
            ready = {c["type"]: c for c in (await status_of(api, "plain")).get("conditions") or []}.get("Ready")
            return ready["message"] if ready and ready["reason"] == "ModelNotResolved" else None

        message = await eventually(refused, "the Ready condition naming the field")
        assert message.startswith("spec.model: version 1 of adapted carries no LoRA adapter"), message
        assert await get(api, f"{RAYSERVICES}/plain") is None
